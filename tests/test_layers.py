"""The import structure of plugin/synlb: no import cycle anywhere (the
layers contract in pyproject.toml, run by `lint-imports`, cannot see a cycle
between modules of one layer), and the contract itself is kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan),
    plus modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # iterative: no recursion limit to think about
        work = [(v, iter(sorted(graph.find_modules_directly_imported_by(v))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w == node:
                    cycles.append([w])
                elif w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                elif w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return cycles


def test_the_cycle_finder_finds_cycles():
    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
        modules = set(edges)

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert sorted(import_cycles(Graph())) == [["a", "b", "c"], ["d"]]


def test_no_import_cycle_in_plugin_synlb():
    # every import counts, a function-level one too; only `if TYPE_CHECKING:`
    # imports (never executed) are left out
    graph = grimp.build_graph("synlb", exclude_type_checking_imports=True, cache_dir=None)
    assert len(graph.modules) > 30  # the whole package
    assert import_cycles(graph) == []


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    r = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
