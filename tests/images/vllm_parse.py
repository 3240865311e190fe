"""Runs inside the real vLLM image: parses command lines with vLLM's own `vllm serve` parser.

Reads a JSON object from stdin, `{"argv": [[...], ...], "options": [...], "choices": [...]}`,
and prints one JSON object: for each command line, null when `vllm serve` would accept it
(parsed, then checked by the same validation `vllm serve` runs before it loads a model) or the
parser's error; the option strings in `options` that the parser does not know; and the choices
of each option in `choices`. Used by test_vllm_contract.py.
"""

from __future__ import annotations

import argparse
import json
import sys


class ParseError(Exception):
    pass


def _raise(self: argparse.ArgumentParser, message: str) -> None:
    raise ParseError(message)


def serve_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser(prog="vllm")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return top


def check(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    from vllm.entrypoints.cli.serve import ServeSubcommand

    try:
        args = parser.parse_args(["serve", *argv])
        ServeSubcommand().validate(args)
    except (ParseError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    request = json.load(sys.stdin)
    argparse.ArgumentParser.error = _raise  # type: ignore[assignment,method-assign]
    parser = serve_parser()
    serve = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["serve"]
    known = set(serve._option_string_actions)
    result = {
        "argv": [check(parser, argv) for argv in request["argv"]],
        "unknown_options": [o for o in request.get("options", []) if o not in known],
        "choices": {
            option: sorted(map(str, serve._option_string_actions[option].choices or ()))
            for option in request.get("choices", [])
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
