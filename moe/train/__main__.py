"""`accelerate launch -m moe.train MODEL --out DIR ...` (or `torchrun ... -m moe.train`): the same arguments as
`moekit train`. An entry point into the command line, kept here because launchers are given this module."""

import sys

from moekit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
