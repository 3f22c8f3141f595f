"""The Captions tab in the real window: browse, edit and save a caption, folder-wide tag edits, the
keep-tokens preview, and a caption in a bad encoding left untouched. Also: the dataset tools
(tagger, captioner, metadata) appear as Tools pages built from their own parsers."""
from __future__ import annotations

import pytest

from tests.dataprep_support import solid_image
from tests.gui_fixtures import app, gui_display, gui_home, make_app, screenshot, wait_until  # noqa: F401

pytestmark = pytest.mark.gui


@pytest.fixture()
def folder(tmp_path):
    data = tmp_path / "img"
    colours = [(200, 30, 30), (30, 160, 60), (40, 60, 200)]
    captions = ["mychar, 1girl, red dress, smile", "mychar, 1girl, green dress", "landscape, blue sky"]
    for i, (rgb, caption) in enumerate(zip(colours, captions)):
        solid_image(data / f"img{i}.png", rgb, size=(320, 240))
        (data / f"img{i}.txt").write_text(caption + "\n", encoding="utf-8")
    solid_image(data / "odd.png", (128, 128, 128))
    (data / "odd.txt").write_bytes("赤いドレス".encode("shift_jis"))
    return data


def tags_in(editor) -> dict:
    tree = editor.tag_tree
    return {tree.item(i, "text"): int(tree.item(i, "values")[0]) for i in tree.get_children()}


def test_caption_editor_browse_edit_and_tag_ops(app, folder):
    editor = app.caption_editor
    app.notebook.select(editor)
    editor.open_folder(str(folder))
    app.root.update()
    assert editor.listbox.get(0, "end") == ("img0.png", "img1.png", "img2.png", "odd.png")
    assert tags_in(editor)["mychar"] == 2 and tags_in(editor)["1girl"] == 2
    assert "odd.txt" in editor.status.cget("text") and "not UTF-8" in editor.status.cget("text")
    assert editor.edited_text() == "mychar, 1girl, red dress, smile"
    box = editor.image_box
    photo = editor._photo  # the image is shown, scaled to the space it has, aspect ratio kept
    assert photo is not None and abs(photo.width() / photo.height() - 320 / 240) < 0.02
    assert (photo.width() == box.winfo_width() or photo.height() == box.winfo_height()) and photo.width() > 100

    editor.keep_var.set(1)
    editor.update_keep_preview()
    assert editor.keep_label.cget("text").startswith("fixed: mychar   shuffled: 1girl, red dress, smile")
    screenshot(app.root, "captions-editor")

    # edit, then Next: the edit is saved atomically, the tag counts follow
    editor.text.insert("end", ", outdoors")
    editor.step(1)
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "mychar, 1girl, red dress, smile, outdoors\n"
    assert tags_in(editor)["outdoors"] == 1 and editor.edited_text() == "mychar, 1girl, green dress"

    # folder-wide: rename a tag, remove one, add one
    editor.tag_var.set("1girl")
    editor.new_tag_var.set("one girl")
    editor.edit_all("replace")
    editor.tag_var.set("smile")
    editor.edit_all("remove")
    editor.tag_var.set("masterpiece")
    editor.edit_all("add")
    assert (folder / "img0.txt").read_text(encoding="utf-8") == \
        "mychar, one girl, red dress, outdoors, masterpiece\n"
    assert (folder / "img2.txt").read_text(encoding="utf-8") == "landscape, blue sky, masterpiece\n"
    assert editor.edited_text() == "mychar, one girl, green dress, masterpiece"  # the shown caption reloaded
    assert tags_in(editor)["masterpiece"] == 3 and "1girl" not in tags_in(editor)

    # search filters the list; the caption in a bad encoding cannot be edited and is never written
    editor.search_var.set("landscape")
    editor.apply_search()
    assert editor.listbox.get(0, "end") == ("img2.png",)
    editor.search_var.set("")
    editor.apply_search()
    editor.show(3)
    assert str(editor.text.cget("state")) == "disabled" and "not UTF-8" in editor.edited_text()
    assert editor.save() is False
    assert (folder / "odd.txt").read_bytes() == "赤いドレス".encode("shift_jis")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_dataset_tools_are_tool_pages(app):
    names = {app.tools_notebook.tab(h, "text"): h for h in app.tools_notebook.tabs()}
    for name in ("Tagger", "Captioner", "Captions→JSON", "Tags→JSON",
                 "Clean JSON"):
        app.notebook.select(app.tools_page)
        app.tools_notebook.select(names[name])
        app.root.update()
        tab = app.tool_tab()
        assert tab is not None, name
    app.tools_notebook.select(names["Tagger"])
    app.root.update()
    tab = app.tool_tab()
    values, _ = tab.values()
    assert values == {}  # untouched form: every field at the script's default (the ", " separator too)
    screenshot(app.root, "tools-tagger")


def test_dataset_tab_opens_the_preparation_tools(app, folder, tmp_path):
    """The Dataset tab's buttons open the caption editor and the tagger on the training images."""
    lora = app.tabs["train_network"]
    parent = tmp_path / "dataset"
    (parent / "10_mychar").mkdir(parents=True)
    for f in folder.glob("img0.*"):
        (parent / "10_mychar" / f.name).write_bytes(f.read_bytes())
    lora.form.fields["train_data_dir"].var.set(str(parent))
    app.notebook.select(app.dataset_tab)
    app.root.update()
    app.dataset_tab.edit_captions()          # train_data_dir: its <repeats>_<name> sub-folders
    editor = app.caption_editor
    assert app.notebook.select() == str(editor) and editor.recursive_var.get()
    assert editor.listbox.get(0, "end") == ("10_mychar/img0.png",)
    app.dataset_tab.h_images.set(str(folder))  # the Images folder wins when set
    app.dataset_tab.open_tool("Tagger")
    tab = app.tool_tab()
    assert app.notebook.select() == str(app.tools_page)
    assert tab.form.fields["train_data_dir"].var.get() == str(folder)
