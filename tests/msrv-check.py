#!/usr/bin/env python3
"""MSRV guard: no workspace crate may declare a `rust-version` lower than the highest
`rust-version` declared by a crate in its dependency tree (as locked in Cargo.lock, with all
of its features, on every target platform). A crate declaring less would promise a Rust
version that cargo then refuses to build it with.

What is checked, per workspace crate:
  - normal and build dependencies (what users of the crate compile);
  - for crates that are not published (`publish = false`), dev-dependencies as well: their
    tests are all they are for.
Our own code's use of newer std APIs is checked by clippy's `incompatible_msrv` lint (`make
lint`); this script needs no old toolchain.

With --build, the crates are then also built (`cargo check --all-features`) with the Rust
version each declares, for each version whose toolchain rustup has installed (`rustup
toolchain install 1.89 --profile minimal`); versions without a toolchain are named and
skipped. That catches language features and std APIs newer than the declared version.

Usage: python3 tests/msrv-check.py [-v] [--build]
  -v: print each crate's figures when all is well
Exit status 1 names each crate, the dependency and both versions (or the failed build).
"""

import json
import re
import subprocess
import sys


def version_key(text):
    """'1.89' and '1.89.0' compare equal; missing parts count as 0."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


class CargoFailed(Exception):
    pass


def cargo(*args):
    done = subprocess.run(["cargo", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise CargoFailed(f"`cargo {' '.join(args)}` failed:\n{done.stderr.rstrip()}")
    return done.stdout


def main():
    verbose = "-v" in sys.argv[1:]
    build = "--build" in sys.argv[1:]
    meta = json.loads(cargo("metadata", "--format-version", "1", "--locked"))
    rust_version = {(p["name"], p["version"]): p["rust_version"] for p in meta["packages"]}
    members = [p for p in meta["packages"] if p["id"] in set(meta["workspace_members"])]
    workspace = {p["name"] for p in members}

    failures = []
    for pkg in sorted(members, key=lambda p: p["name"]):
        name, declared = pkg["name"], pkg["rust_version"]
        if not declared:
            failures.append(f"{name}: declares no rust-version")
            continue
        edges = "normal,build" if pkg["publish"] != [] else "normal,build,dev"
        tree = cargo(
            "tree", "--locked", "-p", f"{name}@{pkg['version']}", "--all-features",
            "--target", "all", "-e", edges, "--prefix", "none", "--format", "{p}",
        )
        deps = set()
        for line in tree.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].startswith("v"):
                dep = (fields[0], fields[1][1:])
                if dep != (name, pkg["version"]):
                    deps.add(dep)
        needing = [(d, rust_version.get(d)) for d in deps if rust_version.get(d)]
        too_new = sorted(
            ((d, v) for d, v in needing if version_key(v) > version_key(declared)),
            key=lambda dv: version_key(dv[1]),
            reverse=True,
        )
        for (dep, dep_version), needs in too_new:
            failures.append(
                f"{name}: rust-version {declared}, but its dependency {dep} {dep_version}"
                f" needs {needs}"
            )
        if verbose and needing:
            # The highest; among equals a dependency from outside the workspace, by name.
            (dep, dep_version), needs = max(
                needing,
                key=lambda dv: (version_key(dv[1]), dv[0][0] not in workspace, dv[0][0]),
            )
            print(f"{name}: rust-version {declared}; highest in its tree: {dep} {dep_version} ({needs})")

    if failures:
        print("msrv-check: rust-version lower than a dependency needs:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        print(
            "  raise the crate's rust-version (Cargo.toml) or pin an older dependency (Cargo.lock)",
            file=sys.stderr,
        )
        return 1
    print(f"msrv-check: {len(members)} crates, each rust-version covers its dependencies")
    if build:
        return build_with_declared_versions(members)
    return 0


def installed_toolchains():
    """The toolchain names rustup lists ('1.89-x86_64-unknown-linux-gnu' -> '1.89')."""
    try:
        listing = subprocess.run(
            ["rustup", "toolchain", "list"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {m.group(1) for m in re.finditer(r"^(\d+\.\d+(?:\.\d+)?)-", listing, re.M)}


def build_with_declared_versions(members):
    toolchains = installed_toolchains()
    by_version = {}
    for pkg in members:
        by_version.setdefault(pkg["rust_version"], []).append(pkg["name"])
    failed = []
    for version in sorted(by_version, key=version_key):
        crates = sorted(by_version[version])
        candidates = [version, f"{version}.0"]
        candidates += sorted(t for t in toolchains if t.startswith(f"{version}."))
        toolchain = next((t for t in candidates if t in toolchains), None)
        if toolchain is None:
            print(f"msrv-check: no Rust {version} toolchain installed; not built: {', '.join(crates)}")
            continue
        print(f"msrv-check: building with Rust {toolchain}: {', '.join(crates)}", flush=True)
        args = [f"+{toolchain}", "check", "--locked", "--keep-going", "--all-features"]
        for crate in crates:
            args += ["-p", crate]
        if subprocess.run(["cargo", *args], check=False).returncode != 0:
            failed.append(version)
    if failed:
        print(f"msrv-check: build failed with Rust {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CargoFailed as failure:
        print(f"msrv-check: {failure}", file=sys.stderr)
        sys.exit(1)
