"""Sample grids: prompts -> generations, captioned, held-out colour-shape combos marked."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.generate import pipeline_images
from training.train import grid_prompts

CELL, TEXT_H, COLUMNS = 128, 44, 4
HELD_OUT_MARK = (200, 0, 0)


def _wrap(text: str, width: int, draw, font):
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def draw_grid(images, captions, held_out, path: Path) -> None:
    rows = (len(images) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + TEXT_H)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    for i, (image, caption, held) in enumerate(zip(images, captions, held_out)):
        x, y = (i % COLUMNS) * CELL, (i // COLUMNS) * (CELL + TEXT_H)
        sheet.paste(Image.fromarray(image).resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        text = ("[held-out] " if held else "") + caption
        colour = HELD_OUT_MARK if held else (0, 0, 0)
        for k, line in enumerate(_wrap(text, CELL - 4, draw, font)[:4]):
            draw.text((x + 2, y + CELL + 1 + 11 * k), line, fill=colour, font=font)
        if held:
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), outline=HELD_OUT_MARK, width=2)
    sheet.save(path)


def sample_grid(pipe, path: Path, guidance_scale: float = 5.0, steps: int = 25) -> None:
    prompts = grid_prompts()
    captions = [p for p, _ in prompts]
    images = pipeline_images(pipe, captions, range(len(captions)), guidance_scale, steps)
    draw_grid(images, captions, [h for _, h in prompts], path)
