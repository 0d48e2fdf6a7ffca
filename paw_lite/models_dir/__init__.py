"""The models directory: what should be there (`manifest`: models/manifest.json, and installed.json
for what paw-lite wrote), whether what is there is intact (`verify`), and how files get there
(`importing` from a folder brought in by hand, `pull` from the hub).

Files used as published are pinned by size and sha256 in the manifest. Files paw_lite converts are
checked structurally (verify_gguf, the mapper's key/shape check) and against the sha256 recorded in
`installed.json` when they were written, so later corruption is caught too."""
