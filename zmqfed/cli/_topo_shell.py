"""The interactive topology builder behind ``zmqfed-topo shell``.

A ``cmd.Cmd`` loop over one :class:`~zmqfed.topo.Topology`, in the spirit of
OpenFed's ``topo_builder``. Arguments are split like a POSIX shell, so quote
names with spaces. When stdin is not a terminal there is no prompt and the
first failing command ends the session with its exit code (like ``sh -e``),
so a pipe of commands works as a script::

    printf 'add_node agg tcp://127.0.0.1:1994\\nadd_node a\\nadd_edge a agg\\nsave t.yaml\\n' \\
        | zmqfed-topo shell
"""

from __future__ import annotations

import cmd
import inspect
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import IO, Any

from zmqfed.cli.exitcodes import INTERRUPTED, OK, USAGE, exit_code_for, report
from zmqfed.cli.topo import PROG, check, compile_report, format_compile, format_of, render
from zmqfed.errors import ZmqfedError
from zmqfed.topo import Node, Topology

__all__ = ["TopoShell", "run_shell"]


class _UsageError(Exception):
    """A command was called with the wrong arguments."""


def _settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` words as a dict; a VALUE that parses as JSON is taken as JSON."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"expected an endpoint or KEY=VALUE, got {pair!r}")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


class TopoShell(cmd.Cmd):
    """Build a topology command by command; ``help`` lists the commands."""

    intro: str | None = "zmqfed topology builder: type help or ? to list commands, quit to leave."
    prompt = "(zmqfed-topo) "

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        interactive: bool,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.topology = topology if topology is not None else Topology()
        self.interactive = interactive
        self.status = OK  # exit code of the first failed command
        self.dirty = False  # changed since the last save or load
        self.lineno = 0
        if not interactive:
            self.use_rawinput = False  # read self.stdin, no readline
            self.prompt = ""
            self.intro = None

    # -- plumbing -------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.stdout.write(text + "\n")

    def _args(self, line: str, least: int, most: int, usage: str) -> list[str]:
        try:
            words = shlex.split(line)
        except ValueError as exc:  # unbalanced quotes
            raise _UsageError(f"{exc}: {line!r}") from None
        if not least <= len(words) <= most:
            raise _UsageError(f"usage: {usage}")
        return words

    def precmd(self, line: str) -> str:
        self.lineno += 1
        return line

    def onecmd(self, line: str) -> bool:
        """Run one command; report an error instead of leaving the loop."""
        try:
            return bool(super().onecmd(line))
        except (_UsageError, ZmqfedError, OSError, ImportError) as exc:
            where = "" if self.interactive else f"line {self.lineno}: "
            report(PROG, f"{where}{exc}")
            code = USAGE if isinstance(exc, _UsageError) else exit_code_for(exc)
            self.status = self.status or code
            return not self.interactive  # a script stops at its first error

    def emptyline(self) -> bool:
        return False  # cmd.Cmd would repeat the last command

    def default(self, line: str) -> None:
        if line.lstrip().startswith("#"):
            return  # a comment in a script
        raise _UsageError(f"unknown command {line.split()[0]!r} (type help)")

    def do_help(self, arg: str) -> bool | None:
        """help [COMMAND]
        List the commands, or show how to use one."""
        func = getattr(self, "do_" + arg.strip(), None) if arg.strip() else None
        if func is not None and func.__doc__:
            self._say(inspect.cleandoc(func.__doc__))
            return None
        return super().do_help(arg)

    def _complete_nodes(self, text: str, *_: object) -> list[str]:
        return [n.nick_name for n in self.topology.nodes if n.nick_name.startswith(text)]

    # -- commands -------------------------------------------------------------------

    def do_add_node(self, line: str) -> None:
        """add_node NAME [ENDPOINT] [KEY=VALUE ...]
        Add a node. An aggregator needs an ENDPOINT (tcp://host:port or
        ipc://path); KEY=VALUE pairs become its settings (VALUE as JSON if it
        parses, else a string), e.g. add_node agg tcp://127.0.0.1:1994 codec=lz4"""
        words = self._args(line, 1, sys.maxsize, "add_node NAME [ENDPOINT] [KEY=VALUE ...]")
        name, rest = words[0], words[1:]
        endpoint = rest.pop(0) if rest and "://" in rest[0] else None
        node = self.topology.add_node(Node(name, endpoint, _settings(rest)))
        self.dirty = True
        self._say(f"added {node!r}")

    def do_add_edge(self, line: str) -> None:
        """add_edge START END
        Add the edge collaborator START -> aggregator END (both must exist)."""
        start, end = self._args(line, 2, 2, "add_edge START END")
        edge = self.topology.add_edge(start, end)
        self.dirty = True
        self._say(f"added {edge!r}")

    def do_remove_node(self, line: str) -> None:
        """remove_node NAME
        Remove a node and all its edges."""
        (name,) = self._args(line, 1, 1, "remove_node NAME")
        node = self.topology.remove_node(name)
        self.dirty = True
        self._say(f"removed {node!r}")

    def do_remove_edge(self, line: str) -> None:
        """remove_edge START END
        Remove the edge START -> END."""
        start, end = self._args(line, 2, 2, "remove_edge START END")
        edge = self.topology.remove_edge(start, end)
        self.dirty = True
        self._say(f"removed {edge!r}")

    def do_show(self, line: str) -> None:
        """show [txt|dot]
        Print the topology as a table (default) or as Graphviz DOT."""
        words = self._args(line, 0, 1, "show [txt|dot]")
        fmt = words[0] if words else "txt"
        if fmt not in ("txt", "dot"):
            raise _UsageError("usage: show [txt|dot]")
        self.stdout.write(render(self.topology, fmt))

    def do_check(self, line: str) -> None:
        """check
        Validate the topology as `zmqfed-topo check` does."""
        self._args(line, 0, 0, "check")
        check(self.topology)
        t = self.topology
        self._say(f"ok: {len(t.nodes)} nodes, {len(t.edges)} edges, {len(t.aggregators)} groups")

    def do_compile(self, line: str) -> None:
        """compile [NAME]
        Show the groups and sockets of one node, or of every node."""
        words = self._args(line, 0, 1, "compile [NAME]")
        self._say(format_compile(compile_report(self.topology, words[0] if words else None)))

    def do_save(self, line: str) -> None:
        """save FILE
        Validate and write the topology: YAML for .yaml/.yml, else JSON."""
        (path,) = self._args(line, 1, 1, "save FILE")
        self.topology.save(path)
        self.dirty = False
        self._say(f"saved {path}")

    def do_load(self, line: str) -> None:
        """load FILE
        Replace the topology with the one in FILE (JSON or YAML)."""
        (path,) = self._args(line, 1, 1, "load FILE")
        self.topology = Topology.load(path)
        self.dirty = False
        self._say(f"loaded {path}: {len(self.topology.nodes)} nodes")

    def do_plot(self, line: str) -> None:
        """plot FILE
        Draw the topology to FILE: .png/.svg/.pdf (matplotlib), .dot or .txt."""
        (path,) = self._args(line, 1, 1, "plot FILE")
        fmt = format_of(Path(path))
        if fmt is None:
            raise _UsageError(
                f"plot FILE: FILE must end in .png, .svg, .pdf, .dot or .txt, got {path!r}"
            )
        render(self.topology, fmt, Path(path))
        self._say(f"wrote {path}")

    def do_quit(self, line: str) -> bool:
        """quit
        Leave the builder (asks once more when there are unsaved changes)."""
        self._args(line, 0, 0, "quit")
        if self.dirty and self.interactive:
            self.dirty = False
            self._say("unsaved changes: save FILE first, or quit again to discard them")
            return False
        return True

    def do_EOF(self, line: str) -> bool:
        """Leave at the end of the input (Ctrl-D)."""
        if self.interactive:
            self._say("")
        return True

    do_exit = do_quit
    complete_add_edge = complete_remove_node = complete_remove_edge = _complete_nodes
    complete_compile = _complete_nodes


def run_shell(path: Path | None = None) -> int:
    """Run the builder on stdin/stdout, starting from ``path`` if given.

    Returns the exit code: in a script (stdin not a terminal) that of the
    first failed command, which ends the run, or 130 on SIGINT; 0 after an
    interactive session.
    """
    topology = Topology.load(path) if path is not None else None
    shell = TopoShell(topology, interactive=sys.stdin.isatty())
    # A process started in the background of a non-interactive shell inherits
    # SIGINT ignored; the builder promises to stop on it all the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            shell.cmdloop()
            return shell.status if not shell.interactive else OK  # a typo is no failure
        except KeyboardInterrupt:
            if not shell.interactive:
                return INTERRUPTED
            shell.intro = None
            shell._say("^C (type quit to leave)")
