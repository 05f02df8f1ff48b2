import pytest

from handler.labels import CLASS_CODES, LESION_CLASSES, REFERRAL_CLASSES, Malignancy, Risk, class_index, lesion_class


def test_fixed_order_matches_ham10000_codes():
    assert CLASS_CODES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert [class_index(code) for code in CLASS_CODES] == list(range(7))


def test_risk_and_malignancy_of_each_class():
    assert lesion_class("mel").risk is Risk.HIGH and lesion_class("mel").malignancy is Malignancy.MALIGNANT
    assert lesion_class("bcc").malignancy is Malignancy.MALIGNANT
    assert lesion_class("akiec").malignancy is Malignancy.PRECANCEROUS
    benign = {c.code for c in LESION_CLASSES if c.malignancy is Malignancy.BENIGN}
    assert benign == {"bkl", "df", "nv", "vasc"}
    assert all(lesion_class(code).risk is Risk.LOW for code in benign)
    assert set(REFERRAL_CLASSES) == {"akiec", "bcc", "mel"}


def test_full_names_and_case_insensitive_lookup():
    assert lesion_class("MEL").name == "Melanoma"
    assert all(len(c.name) > 5 for c in LESION_CLASSES)


def test_unknown_code_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown lesion class 'xyz'"):
        lesion_class("xyz")
