"""COCO captions: every caption a row, images found under the conventional folder or
data.image_root, the split keeping an image's captions together, hostile names refused, and
evaluation against every reference caption of an image."""

import json
import math

import pytest
from formats import COLORS, write_coco

from moevlm import evaluate as evaluation
from moevlm.config import load_config
from moevlm.data.coco import read_coco
from moevlm.data.dataset import ImageTextDataset, split_samples
from moevlm.data.images import ScratchImages
from moevlm.data.sources import read_data
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import DataError
from moevlm.evaluate import reference_groups
from moevlm.metrics import bleu4, exact_match
from moevlm.models.vlm import VLM


def test_every_caption_is_a_row_of_its_image(tmp_path):
    path = write_coco(tmp_path, captions_per_image=3)
    samples, skipped = read_data(path, load_config("tiny").data)
    assert len(samples) == 12 and not skipped
    assert samples[4].image == str(tmp_path / "train2017" / "000000000002.png")
    assert [s.turns[0][1] for s in samples[:3]] == ["a red square", "one red square", "the red square"]
    assert samples[5].row == 6


def test_a_repeated_image_id_is_refused_naming_both_files(tmp_path):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][2]["id"] = 2  # 000000000003.png now claims id 2 too: whose captions are they?
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        read_coco(path)
    assert str(err.value) == (f"{path}: COCO image id 2 appears twice in 'images' (file_name '000000000002.png' "
                              "and '000000000003.png')")


def test_split_keeps_an_images_captions_on_one_side(tmp_path):
    samples, _ = read_coco(write_coco(tmp_path))
    train, val = split_samples(samples, 0.5, seed=0)
    assert len(val) == 6 and {s.image for s in train}.isdisjoint({s.image for s in val})


def test_image_root_setting_and_the_folder_beside_the_file(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "train2017").rename(tmp_path / "pictures")
    with pytest.raises(DataError, match=r"captions_train2017.json: row 1: cannot|does not exist"):
        ImageTextDataset(read_coco(path)[0], Tokenizer.train(["a"], "char", 0), ScratchImages(8), 40)
    samples, _ = read_coco(path, root=str(tmp_path / "pictures"))
    assert samples[0].image == str(tmp_path / "pictures" / "000000000001.png")


@pytest.mark.parametrize("name, problem", [
    ("../secret.png", "image file name '../secret.png' points outside the image folder"),
    ("/etc/passwd", "image file name '/etc/passwd' points outside the image folder"),
])
def test_names_leading_outside_the_image_folder_are_refused_before_reading(tmp_path, name, problem):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][1]["file_name"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        read_coco(path)
    assert str(info.value).startswith(f"{path}: row 4: {problem}") and "\n" not in str(info.value)
    samples, skipped = read_coco(path, on_bad_row="skip")
    assert len(samples) == 9 and len(skipped) == 3


def test_an_annotation_without_an_image_entry_is_a_bad_row(tmp_path):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][2]["image_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"^.*captions_train2017.json: row 3: image_id 99 has no entry in 'images'$"):
        read_coco(path)


def test_a_json_object_that_is_not_coco_says_so(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"d.json: a JSON object must be COCO annotations, but has no 'annotations'"):
        read_data(path, load_config("tiny").data)


def test_eval_groups_the_captions_of_an_image(tmp_path):
    samples, _ = read_coco(write_coco(tmp_path, captions_per_image=3))
    tok = Tokenizer.train([s.turns[0][1] for s in samples], "char", 0)
    dataset = ImageTextDataset(samples, tok, ScratchImages(8), 40)
    assert reference_groups(dataset) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_bleu_and_exact_match_with_several_references():
    predictions = ["the red cat sat", "a blue box"]
    references = [["the red cat sat down", "a red cat sat"], ["a blue box"]]
    # Every n-gram of both predictions is in some reference, and the closest reference lengths
    # (4 and 3) equal the predictions' (7 words): BLEU 1. Against the first references alone the
    # precisions are the same but the references have 8 words: brevity penalty exp(1 - 8/7).
    assert bleu4(predictions, references) == pytest.approx(1.0)
    assert bleu4(predictions, [refs[0] for refs in references]) == pytest.approx(math.exp(1 - 8 / 7))
    assert exact_match(predictions, references) == 0.5
    assert exact_match(["a red cat sat", "x"], references) == 0.5


def test_evaluate_scores_each_image_once_against_all_its_captions(tmp_path, monkeypatch):
    samples, _ = read_coco(write_coco(tmp_path, captions_per_image=3))
    tok = Tokenizer.train([s.turns[0][1] for s in samples], "char", 0)
    cfg = load_config("tiny", overrides=[f"decoder.vocab_size={tok.vocab_size}"])
    dataset = ImageTextDataset(samples, tok, ScratchImages(cfg.model.vision.image_size), 40)
    names = {rgb: name for name, rgb in COLORS.items()}

    def captions(model, tokenizer, images, prompts, **options):  # "one <colour> square": the second reference
        return [f"one {names[tuple(image[:, 0, 0].tolist())]} square" for image in images]

    monkeypatch.setattr(evaluation, "generate_texts", captions)
    result = evaluation.evaluate(VLM(cfg.model), dataset, tok, batch_size=3)
    assert len(result["predictions"]) == 4 and result["num_samples"] == 12
    assert result["exact_match"] == 1.0 and result["bleu4"] == pytest.approx(1.0)
    # CIDEr-D against all three captions of each of the 4 images: "a", "one", "the" and "square" are
    # in every image's references (IDF 0), the colour's n-grams in one (IDF log 4). Against "one red
    # square" itself orders 1-3 give cosine 1 each; against "a red square" (and "the ...") order 1
    # gives 1 ("red" is the only weighted word), order 2 gives 1/2 ("red square" of two bigrams),
    # order 3 gives 0. Per image 10 * (3 + 1.5 + 1.5) / 4 orders / 3 references = 5; against the
    # first reference alone it would be 10 * 1.5 / 4 = 3.75.
    assert result["cider_d"] == pytest.approx(5.0)
    assert result["predictions"][1] == ("a green square", "one green square")
