"""Each source layout as its publisher ships it, merged into one manifest."""

import shutil

import pytest
from conftest import SAMPLE

from covfeat.core.errors import DataError, SourceNotFound
from covfeat.extraction.sources import COVID, NORMAL, detect_layout, kermany_patient, load_sources


def test_cohen_keeps_covid_pa_and_reports_missing(mini):
    m = load_sources([mini["cohen"]])
    assert len(m.records) == mini["n_covid"]
    assert all(r.label == COVID and r.source == "cohen" and r.view == "PA" for r in m.records)
    assert all(r.patient_id.startswith("cohen:") for r in m.records)
    assert [p.endswith("not-on-disk.jpg") for p, _ in m.missing] == [True]
    assert m.ignored == {"cohen: finding is not COVID-19": 1}
    assert "1 listed files missing" in m.summary()


def test_cohen_view_filter(mini):
    assert load_sources([mini["cohen"]], views=("AP",)).records == []


@pytest.mark.parametrize("layout", ["normal_folder", "kermany_root", "kermany_split_root"])
def test_kermany_layouts(tmp_path, mini, layout):
    if layout == "normal_folder":
        src = mini["normal"]
    elif layout == "kermany_root":
        src = mini["normal"].parent
    else:
        src = tmp_path / "chest_xray"
        shutil.copytree(mini["normal"], src / "train" / "NORMAL")
        (src / "train" / "PNEUMONIA").mkdir()
    assert detect_layout(src) == "kermany"
    m = load_sources([src])
    assert len(m.records) == mini["n_normal"] and {r.label for r in m.records} == {NORMAL}
    assert all(r.patient_id == "kermany:" + kermany_patient(r.path.rsplit("/", 1)[1]) for r in m.records)


def test_kermany_patient_from_file_name():
    assert kermany_patient("IM-0115-0001.jpeg") == "IM-0115"
    assert kermany_patient("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert kermany_patient("NORMAL2-IM-0587-0001-0002.jpeg") == "NORMAL2-IM-0587"


def test_class_folders_and_duplicates(tmp_path, mini):
    root = tmp_path / "folders"
    shutil.copytree(mini["cohen"] / "images", root / "COVID-19")
    shutil.copytree(mini["normal"], root / "normal")
    first = sorted((root / "normal").iterdir())[0]
    shutil.copy(first, root / "normal" / ("copy-" + first.name))  # byte-identical duplicate
    (root / "PNEUMONIA").mkdir()
    m = load_sources([root])
    assert m.counts() == {"COVID-19": mini["n_covid"], "NORMAL": mini["n_normal"]}
    assert len(m.duplicates) == 1
    assert "1 byte-identical duplicates dropped" in m.summary()


def test_manifest_csv(tmp_path, mini):
    imgs = sorted((mini["cohen"] / "images").iterdir())[:2] + sorted(mini["normal"].iterdir())[:2]
    csv_path = tmp_path / "list.csv"
    lines = ["path,label,patient_id,source"] + [
        f"{p},{'COVID-19' if i < 2 else 'NORMAL'},p{i // 2},site{i % 2}" for i, p in enumerate(imgs)
    ] + [f"{tmp_path / 'gone.png'},normal,p9,site0"]
    csv_path.write_text("\n".join(lines) + "\n")
    m = load_sources([csv_path])
    assert [r.label for r in m.records] == [1, 1, 0, 0]
    assert m.records[0].patient_id == "site0:p0" and len(m.missing) == 1


def test_same_source_twice_is_deduplicated(mini):
    m = load_sources([mini["normal"], mini["normal"]])
    assert len(m.records) == mini["n_normal"] and len(m.duplicates) == mini["n_normal"]


def test_unknown_layout_and_missing_source(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="not a known layout"):
        load_sources([tmp_path / "stuff"])
    with pytest.raises(SourceNotFound, match="no such file or folder"):
        load_sources([tmp_path / "nope"])


def test_bundled_sample_loads():
    m = load_sources([SAMPLE / "cohen", SAMPLE / "kermany" / "NORMAL"])
    assert m.counts() == {"COVID-19": 30, "NORMAL": 30} and not m.missing


@pytest.mark.slow
def test_reproduction_set_loads_as_it_is():
    from conftest import SHARED

    m = load_sources([SHARED / "cohen", SHARED / "kermany" / "NORMAL"])
    assert m.counts() == {"COVID-19": 139, "NORMAL": 661}
    assert len(m.duplicates) == 1 and len(m.missing) == 1
    assert len({r.patient_id for r in m.records if r.label == COVID}) == 90
