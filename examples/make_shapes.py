"""Draw the example scene used by ``make demo`` (examples/shapes.png)."""

from pathlib import Path

from PIL import Image, ImageDraw


def draw(path: Path) -> None:
    image = Image.new("RGB", (320, 240), "white")
    pen = ImageDraw.Draw(image)
    pen.rectangle((20, 30, 110, 120), fill="red")
    pen.ellipse((150, 40, 200, 90), fill="red")
    pen.polygon([(240, 150), (300, 220), (180, 220)], fill="blue")
    pen.ellipse((40, 160, 90, 210), fill="green")
    image.save(path, optimize=True)


if __name__ == "__main__":
    draw(Path(__file__).with_name("shapes.png"))
