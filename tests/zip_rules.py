"""The zip rule, as cases both sides are tested on: the API (tests/service/test_zip_rules.py) and the web page's
reader (tests/browser/test_ui.py). The rule, as the README states it:

- left out: folder entries, anything under ``__MACOSX/`` or under a name starting with ``.`` (``.DS_Store``,
  ``._photo.jpg``), and every file whose name does not end in an image extension (``Thumbs.db``,
  ``desktop.ini``, ``notes.txt``);
- one wrapper folder around the class folders is looked through;
- every image must sit in a class folder, and every class folder must hold an image;
- every image is decoded: a file named like an image that is not one rejects the archive.
"""
from __future__ import annotations

IMAGE = "image"  # stands for a real PNG in a case

CASES = {
    "system and hidden files are left out": (
        {"pets/cat/a.png": IMAGE, "pets/cat/Thumbs.db": b"\xd0\xcf\x11\xe0junk", "pets/dog/b.png": IMAGE,
         "pets/dog/DESKTOP.INI": b"[.ShellClassInfo]", "pets/.DS_Store": b"\0\0\0\1Bud1",
         "__MACOSX/pets/cat/._a.png": b"junk", "pets/dog/notes.txt": b"a note", "pets/cat/.hidden.png": b"junk",
         "pets/dog/c.jpeg": IMAGE},
        {"cat": 1, "dog": 2}),
    "a non-image beside the class folders is left out": (
        {"README.txt": b"read me", "red/a.png": IMAGE, "blue/b.png": IMAGE, "blue/Thumbs.db": b"junk"},
        {"red": 1, "blue": 1}),
    "system files beside a wrapper folder do not hide it": (
        {"Thumbs.db": b"junk", "set/red/a.png": IMAGE, "set/blue/b.png": IMAGE, "set/desktop.ini": b"junk"},
        {"red": 1, "blue": 1}),
    "an image outside a class folder": (
        {"loose.png": IMAGE, "red/b.png": IMAGE, "blue/c.png": IMAGE},
        ("archive_layout", "not inside a class folder")),
    "a class folder with only system files": (
        {"red/a.png": IMAGE, "blue/Thumbs.db": b"junk", "green/c.png": IMAGE},
        ("empty_class", "has no images")),
}


def materialise(entries: dict, image: bytes) -> dict[str, bytes]:
    return {name: image if content == IMAGE else content for name, content in entries.items()}
