#!/usr/bin/env python3
"""deb-copyright.py: the package's machine-readable debian/copyright (DEP-5), generated
from `cargo metadata` so it cannot drift from Cargo.lock.

Lists snapveil itself and every crate statically linked into /usr/bin/snapveil: the
normal (not dev, not build) dependencies for the host platform, walked from the root
package, without descending into proc-macro crates (they run in the compiler and are
not linked in). Each licence named (SPDX in Cargo.toml, DEP-5 short names here) gets one
stand-alone License paragraph, its text from packaging/debian/licenses/NAME, or a
pointer to /usr/share/common-licenses for Apache-2.0 and GPL-2. A crate under a licence with no
text there is an error naming the crate and the file to add.

Usage: deb-copyright.py REPO  (writes the copyright file on stdout)
"""
import json
import re
import subprocess
import sys
from pathlib import Path

FORMAT = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
SPDX_TO_DEP5 = {"MIT": "Expat", "GPL-2.0-only": "GPL-2"}
COMMON = {"Apache-2.0": "Apache-2.0", "GPL-2": "GPL-2"}


def die(msg):
    print(f"deb-copyright: {msg}", file=sys.stderr)
    sys.exit(1)


def dep5_expr(spdx, crate):
    """'(MIT OR Apache-2.0) AND Unicode-3.0', 'MIT/Apache-2.0', 'Apache-2.0 WITH
    LLVM-exception OR MIT' -> (the DEP-5 expression, the licence names it uses)."""
    toks = re.findall(r"\(|\)|[^\s()/]+|/", spdx)
    names, out, i = set(), [], 0
    while i < len(toks):
        tok = toks[i]
        if tok in ("OR", "/"):
            out.append("or")
        elif tok == "AND":
            out.append("and")
        elif tok in "()":
            out.append(tok)
        elif re.fullmatch(r"[A-Za-z0-9.+-]+", tok):
            name = SPDX_TO_DEP5.get(tok, tok)
            if i + 2 < len(toks) and toks[i + 1] == "WITH":
                name = f"{name} with {toks[i + 2]}"
                i += 2
            names.add(name)
            out.append(name)
        else:
            die(f"crate {crate}: cannot read licence expression {spdx!r}")
        i += 1
    return " ".join(out).replace("( ", "(").replace(" )", ")"), names


def main():
    repo = Path(sys.argv[1])
    host = re.search(r"^host: (\S+)$", subprocess.run(
        ["rustc", "-vV"], capture_output=True, text=True, check=True).stdout, re.M).group(1)
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host,
         "--manifest-path", str(repo / "Cargo.toml")],
        capture_output=True, text=True, check=True).stdout)
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    linked, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in linked:
            continue
        linked.add(pid)
        for dep in nodes[pid]["deps"]:
            if not any(k["kind"] is None for k in dep["dep_kinds"]):
                continue
            kinds = {k for t in pkgs[dep["pkg"]]["targets"] for k in t["kind"]}
            if "proc-macro" in kinds:
                continue
            stack.append(dep["pkg"])

    me = pkgs[root]
    lic_dir = repo / "packaging/debian/licenses"
    used = set()
    paras = []
    text, names = dep5_expr(me["license"], me["name"])
    used |= names
    paras.append(f"Files: *\nCopyright: snapveil developers\nLicense: {text}")
    crates = sorted((pkgs[p] for p in linked if p != root), key=lambda p: (p["name"], p["version"]))
    for c in crates:
        if not c.get("license"):
            die(f"crate {c['name']} {c['version']} declares no SPDX licence (license-file only)")
        text, names = dep5_expr(c["license"], c["name"])
        used |= names
        authors = [re.sub(r"\s*<[^>]*>", "", a).strip() for a in c.get("authors") or []]
        holders = ", ".join(a for a in authors if a) or f"the {c['name']} developers"
        where = c.get("repository") or c.get("homepage") or f"https://crates.io/crates/{c['name']}"
        paras.append(
            f"Files: rust-crates/{c['name']}-{c['version']}/*\n"
            f"Copyright: {holders}\n"
            f"License: {text}\n"
            f"Comment: crate {c['name']} {c['version']} ({where}), statically linked into\n"
            f" /usr/bin/snapveil.")
    for name in sorted(used):
        if name in COMMON:
            body = (f" On Debian systems, the full text of the {name} licence is in\n"
                    f" /usr/share/common-licenses/{COMMON[name]}.")
        elif (lic_dir / name.split(" with ")[-1]).is_file():
            body = "\n".join(" " + l if l.strip() else " ." for l in
                             (lic_dir / name.split(" with ")[-1]).read_text().rstrip("\n").split("\n"))
            if " with " in name:
                base = name.split(" with ")[0]
                body = (f" The {base} licence (/usr/share/common-licenses/{COMMON[base]}), with this\n"
                        f" exception:\n .\n" + body)
        else:
            users = [c["name"] for c in crates if name in dep5_expr(c["license"], c["name"])[1]]
            die(f"no text for licence {name} (crates: {', '.join(users)}): "
                f"add packaging/debian/licenses/{name}")
        paras.append(f"License: {name}\n{body}")

    print(f"Format: {FORMAT}\nUpstream-Name: snapveil\nSource: https://example.org/snapveil\n"
          f"Comment: Generated from Cargo.lock by scripts/deb-copyright.py: snapveil and the\n"
          f" {len(crates)} crates linked into /usr/bin/snapveil (\"rust-crates/\" names\n"
          f" their sources as published on crates.io).\n")
    print("\n\n".join(paras))


if __name__ == "__main__":
    main()
