"""`paw-lite models pull|import|list|verify`: the models directory ($PAW_LITE_MODELS)."""

from __future__ import annotations

import argparse
import sys

from ..atomic import check_writable
from ..errors import PawError, malformed_file
from . import emit

_ROLE_CHOICES = ("interpreter", "compiler", "mapper", "compiler_meta", "pseudo_compiler")
_FAMILY_CHOICES = ("compact", "standard", "all")
# How `models list|verify` heads each family's rows.
_FAMILY_TITLES = {"compact": "Compact programs (GPT-2 interpreter, compiler paw-4b-gpt2)",
                  "standard": "Standard programs (Qwen3-0.6B interpreter, compiler paw-4b-qwen3-0.6b)",
                  "both": "Both families (the pseudo compiler)"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="get, import, list and verify the model files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    pull = actions.add_parser("pull", help="download the published models and convert them (needs a network)")
    imp = actions.add_parser("import", help="import model files brought in by hand (converting what needs it)")
    imp.add_argument("src", help="folder with the downloads: gpt2-q8_0.gguf, qwen3-0.6b-q6_k.gguf, the paw-4b-gpt2 or "
                                 "paw-4b-qwen3-0.6b download (each in a folder of its own), a Qwen3 folder or GGUF")
    for sp in (pull, imp):
        sp.add_argument("--quant", default="q4_k_m", choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                        help="type of the pseudo compiler (Qwen3-4B-Instruct-2507) when converted; default q4_k_m")
        sp.add_argument("--compiler-quant", default="q8_0", choices=["f16", "bf16", "q8_0", "q6_k"],
                        help="type of the trained compiler; default q8_0 (its hidden states feed the mapper)")
        sp.add_argument("--only", nargs="+", choices=_ROLE_CHOICES, default=list(_ROLE_CHOICES), metavar="ROLE",
                        help=f"only these files ({', '.join(_ROLE_CHOICES)})")
    pull.add_argument("--family", choices=_FAMILY_CHOICES, default="compact",
                      help="the files of Compact programs (GPT-2, the default), Standard programs (Qwen3-0.6B) or all")
    imp.add_argument("--family", choices=_FAMILY_CHOICES, default="all",
                     help="import only the files of this family (default: whatever the folder holds); a compiler "
                          "without its meta.json beside it is taken as this family's")
    lst = actions.add_parser("list", help="what is in the models directory and which commands each file serves")
    ver = actions.add_parser("verify", help="like list, and check sha256 and structure of every file")
    for sp in (pull, imp, lst, ver):
        sp.add_argument("--models", help="models directory (default $PAW_LITE_MODELS or the user cache)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=run)


def _progress():
    """A bar that restarts for each conversion pass, named after the file it writes."""
    from tqdm import tqdm

    bar = tqdm(unit="tensor", file=sys.stderr, leave=False, disable=None)

    def on_step(what: str, n_tensors: int | None) -> None:
        bar.reset(total=n_tensors)
        bar.set_description(what, refresh=False)
        bar.set_postfix_str("", refresh=False)

    def on_tensor(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    return bar, on_tensor, on_step


def _fetch(args: argparse.Namespace, directory) -> int:
    from ..models_dir.importing import ImportOptions, import_dir
    from ..models_dir.pull import pull

    from ..families import FAMILIES

    families = tuple(FAMILIES) if args.family == "all" else (args.family,)
    options = ImportOptions(quant=args.quant, compiler_quant=args.compiler_quant, roles=tuple(args.only), families=families)
    check_writable(directory, "--models", into=True)  # before any download or conversion
    bar, on_tensor, on_step = _progress()
    try:
        if args.action == "pull":
            done = pull(directory, options, on_tensor=on_tensor, on_step=on_step)
        else:
            with malformed_file(args.src, "model download (a file in it)"):
                done = import_dir(args.src, directory, options, on_tensor=on_tensor, on_step=on_step)
    finally:
        bar.close()
    lines = [f"{d['name']:<40} {d['bytes']:>15,} bytes  {d['how']}" for d in done]
    # Importing part of the set is normal (running programs needs only the interpreter), but a file
    # left out unnoticed shows up only when compile fails: say which were not there, for each family
    # asked for (an import of whatever a folder holds: each family it brought something of).
    got = {(d["family"], d["role"]) for d in done}
    if args.action == "import" and args.family == "all":  # the families the folder held files of; none: Compact's
        families = tuple(f for f in families if any(fam == f for fam, _ in got)) or ("compact",)
    not_found = [f"{role} ({family})" if len(families) > 1 and role != "pseudo_compiler" else role
                 for family in families for role in args.only
                 if (family, role) not in got and not (role == "pseudo_compiler" and ("both", role) in got)]
    not_found = list(dict.fromkeys(not_found))  # the shared pseudo compiler once
    if not_found:
        where = "in the download" if args.action == "pull" else f"in {args.src} or its subfolders"
        lines.append(f"not found {where}: {', '.join(not_found)}")
    emit(args, {"models_dir": str(directory), "written": done, "not_found": not_found},
         "\n".join([f"models directory {directory}", *lines]))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..models_dir.manifest import models_directory
    from ..models_dir.verify import NOT_A_FOLDER, NOT_A_FOLDER_FIX, summarize, survey

    directory = models_directory(args.models)
    if args.action in ("pull", "import"):
        return _fetch(args, directory)
    if directory.exists() and not directory.is_dir():
        raise PawError(f"{directory}: {NOT_A_FOLDER}; {NOT_A_FOLDER_FIX}")
    statuses = survey(directory, verify=args.action == "verify")
    rows = summarize(statuses)
    width = max(len(r["name"]) for r in rows)
    lines = [f"models directory {directory}"]
    for family, title in _FAMILY_TITLES.items():
        rows_of = [r for r in rows if r["family"] == family]
        if rows_of:
            lines.append(f"{title}:")
        for r in rows_of:
            size = f"{r['bytes']:>15,}" if r["bytes"] is not None else " " * 15
            lines.append(f"  {r['status']:<8} {r['name']:<{width}} {size}  {r['role']}: {', '.join(r['serves'])}")
            if r["detail"]:
                lines.append(f"           {r['detail']}")
    bad = [r for r in rows if r["status"] == "bad"]
    # Missing files are normal (running programs needs only the interpreter), but a verify that
    # found nothing at all to check has not verified anything.
    nothing = args.action == "verify" and all(r["status"] == "missing" for r in rows)
    if nothing:
        lines.append(f"no model files to verify in {directory}: get them with `paw-lite models pull`, or point "
                     f"--models / PAW_LITE_MODELS at the folder that holds them")
    emit(args, {"models_dir": str(directory), "files": rows, "ok": not bad and not nothing}, "\n".join(lines))
    return 1 if bad or nothing else 0
