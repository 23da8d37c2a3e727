"""Fake of ``flashinfer.tllm_enums``: the one enum the all-to-all signatures mention."""

from enum import IntEnum


class SfLayout(IntEnum):
    layout_128x4 = 0
    layout_8x4 = 1
    layout_linear = 2
