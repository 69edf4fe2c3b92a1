"""`accelerate launch -m moe.train MODEL --out DIR ...` (or `torchrun ... -m moe.train`): the same arguments as
`moekit train`. An entry point into the command line, kept here because launchers are given this module."""

import sys

from moekit import main  # its Ctrl-C guard too

args = sys.argv[1:]
debug = ["--debug"] if "--debug" in args else []
sys.exit(main([*debug, "train", *(a for a in args if a != "--debug")]))
