"""`backsmooth presets`: list the named presets."""

import argparse

from backsmooth.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No flags."""


def main(args: argparse.Namespace) -> int:
    print(f"{'preset':<44} {'dataset':<13} {'arch':<16} {'method':<19} {'epochs':>6}")
    for name, values in PRESETS.items():
        print(f"{name:<44} {values['dataset']:<13} {values['arch']:<16} {values['method']:<19} {values['epochs']:>6}")
    return 0
