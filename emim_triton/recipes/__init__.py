"""Shipped training recipes (YAML), usable by name: ``emim-train --config ssv2_s16 ...``.

Each file sets only what differs from the trainer's defaults (``emim_triton/train/config.py``); flags on the
command line override it. Values come from PAPER-NOTES.md ("Training recipe") where the authors' runs give
them; each file says where it departs from that.
"""
