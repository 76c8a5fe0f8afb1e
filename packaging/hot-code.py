#!/usr/bin/env python3
"""Writes agent/corrald-hot.ld from running corrald processes (see packaging/hot-code.sh).

    hot-code.py pages PID OUT
    hot-code.py script ELF LINK_MAP OUT PAGES...

`pages` writes the file pages of PID's executable mapping of corrald that are resident.
`script` takes those of one or more processes that ran ELF, linked with every function
aligned to a page and with the link map LINK_MAP (LLD's `-Map`): each such page belongs to
one function's section, and those sections, in address order, make the `.text.hot` output
section of OUT.
"""
import fnmatch
import re
import struct
import subprocess
import sys

PAGE = 4096


def resident_code_pages(pid):
    """File pages of the process's executable mapping of corrald that are resident."""
    pages = set()
    with open(f'/proc/{pid}/maps') as maps:
        for line in maps:
            f = line.split()
            if len(f) < 6 or not f[5].endswith('/corrald') or 'x' not in f[1]:
                continue
            start, end = (int(x, 16) for x in f[0].split('-'))
            first = int(f[2], 16) // PAGE
            with open(f'/proc/{pid}/pagemap', 'rb') as pm:
                pm.seek(start // PAGE * 8)
                entries = pm.read((end - start) // PAGE * 8)
            for i in range((end - start) // PAGE):
                if struct.unpack_from('<Q', entries, i * 8)[0] >> 63:
                    pages.add(first + i)
    return pages


def loads(elf):
    """(file offset, virtual address, file size) of each PT_LOAD."""
    out = subprocess.run(['readelf', '-lW', elf], capture_output=True, text=True, check=True)
    segs = []
    for line in out.stdout.splitlines():
        f = line.split()
        if f and f[0] == 'LOAD':
            segs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    return segs


def file_page(segs, va):
    for off, vaddr, size in segs:
        if vaddr <= va < vaddr + size:
            return (va - vaddr + off) // PAGE
    return None


# An input section line of LLD's map: VMA LMA Size Align, then `object:(section)`.
INPUT = re.compile(r'^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+\S.*:\((\.text\.[^)\s]+)\)$')
# Rust's v0 names (`_R…`, `.cargo/config.toml`) spell out a function's path and generic
# arguments. Between two builds of the same source only the crates' disambiguators differ
# (`Cs` + base 62 + `_`: a hash of the crate's build, which for the workspace's own crates
# includes the checkout's path), and with a disambiguator of another length the back-references
# (`B` + base 62 + `_`, byte offsets into the name) to what follows it. Both are left open; the
# pattern may open a little more of an identifier that happens to look alike, never less.
# A generic function's name ends in the crate that instantiated it, and which crate's copy
# the build keeps (the agent's library or the corrald binary, say) differs between builds
# too. So the list names each function twice: first with its instantiating crate, which
# gathers the functions that ran tightly where the same copies are kept; then, after all of
# those, without it, which gathers every crate's copy of a hot instance, the one that runs
# where another copy is kept among them.
V0 = re.compile(r'^(\.text\.(?:unlikely\.)?)(_R.*)$')
CRATE = re.compile(r'Cs[0-9A-Za-z]+_')
BACKREF = re.compile(r'B[0-9A-Za-z]*_')


def pattern(section, any_copy=False):
    """The section's name with its build-specific parts replaced by `*` (v0 names only), and
    with `any_copy` its instantiating crate as well."""
    match = V0.match(section)
    if not match:
        return section
    name = BACKREF.sub('B*_', CRATE.sub('Cs*_', match.group(2)))
    return match.group(1) + (without_instantiating_crate(name) if any_copy else name)


# The instantiating crate: `Cs*_` and the crate's name (decimal length, then that many
# characters) or a back-reference, at the very end of the name.
TRAILING_CRATE = re.compile(r'Cs\*_(\d+)([A-Za-z0-9_]+)$')


def without_instantiating_crate(name):
    if name.endswith('B*_'):
        return name[:-3] + '*'
    match = TRAILING_CRATE.search(name)
    if match and len(match.group(2)) == int(match.group(1)):
        return name[:match.start()] + '*'
    return name


def main():
    if len(sys.argv) == 4 and sys.argv[1] == 'pages':
        pages = resident_code_pages(sys.argv[2])
        with open(sys.argv[3], 'w') as o:
            o.writelines(f'{p}\n' for p in sorted(pages))
        return
    if len(sys.argv) < 6 or sys.argv[1] != 'script':
        sys.exit(__doc__)
    elf, link_map, out = sys.argv[2:5]
    touched = set()
    for name in sys.argv[5:]:
        with open(name) as f:
            touched.update(int(line) for line in f if line.strip())
    segs = loads(elf)
    hot = []
    every = {}
    with open(link_map) as m:
        for line in m:
            match = INPUT.match(line)
            if not match:
                continue
            va, size, section = int(match.group(1), 16), int(match.group(2), 16), match.group(3)
            every[section] = size
            first, last = file_page(segs, va), file_page(segs, va + max(size, 1) - 1)
            if first is None or last is None:
                continue
            if any(p in touched for p in range(first, last + 1)):
                hot.append((va, section))
    hot.sort()
    sections = list(dict.fromkeys(s for _, s in hot))
    if len(sections) < 500:
        sys.exit(f'hot-code.py: only {len(sections)} functions resident; was the page cache cold?')
    if not any(V0.match(s) for s in sections):
        sys.exit('hot-code.py: no v0 symbol names; was the build made with .cargo/config.toml?')
    patterns = list(dict.fromkeys([pattern(s) for s in sections] +
                                  [pattern(s, any_copy=True) for s in sections]))
    # What the patterns gather beyond the functions that ran, in this build.
    wild = [fnmatch.translate(p) for p in patterns if '*' in p]
    opened = re.compile('|'.join(wild)) if wild else None
    hot_set = set(sections)
    extra = [s for s in every if opened and s not in hot_set and opened.match(s)]
    gathered = sum(every[s] for s in sections) + sum(every[s] for s in extra)
    with open(out, 'w') as o:
        o.write('/* Generated by packaging/hot-code.sh: the functions corrald ran under its\n')
        o.write(' * workload, in address order, by v0 name without the builds\' hashes, then\n')
        o.write(' * without their instantiating crate. Used by agent/build.rs; the package\n')
        o.write(' * test compares .text.hot with this figure:\n')
        o.write(f' * gathered: {gathered} bytes in the build the list was made from. */\n')
        o.write('SECTIONS\n{\n  .text.hot : {\n')
        for p in patterns:
            o.write(f'    *({p})\n')
        o.write('  }\n}\nINSERT BEFORE .text;\n')
    print(f'hot-code.py: {len(sections)} functions on {len(touched)} resident pages, '
          f'{len(patterns)} patterns -> {out}; they also match {len(extra)} other functions '
          f'of this build; {gathered} bytes in all')


if __name__ == '__main__':
    main()
