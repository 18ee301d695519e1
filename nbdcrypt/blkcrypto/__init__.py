"""Inline encryption modelled on the Linux kernel's blk-crypto (block/blk-crypto*.c)."""
