"""The review page (ctcohort.review_page): the HTML it writes, checked as text, and the page itself in headless
Chromium (tests/browser.py): order, filters, larger view, keys, decisions and the downloaded TSV."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from browser import browser  # noqa: F401  (the fixture)
from PIL import Image

from ctcohort.review_page import (
    DECISION_COLUMNS,
    DECISIONS_FILE,
    read_decisions,
    review_order,
    write_review_page,
)

NASTY = "</script><b>bold</b><!--"
# subject, score, status, flags as (structure, flag, detail)
COHORT = [
    (
        "s_high",
        9.0,
        "",
        [
            ("", "cut_off", "z+"),
            ("liver", "volume_outlier", "robust z = 5.2"),
            ("kidney_left", "implausible_hu", NASTY),
        ],
    ),
    ("s_mid", 4.0, "", [("liver", "fragments", "3 pieces"), ("spleen", "volume_outlier", "robust z = 4.1")]),
    ("s_tie_b", 2.0, "", []),
    ("s_tie_a", 2.0, "", [("kidney_right", "laterality", "centroid on the left")]),
    ("s_none", np.nan, "failed at segment: out of memory", [("", "failed", "segment")]),
    ("s_low", -1.0, "", []),
]
ORDER = ["s_high", "s_mid", "s_tie_a", "s_tie_b", "s_low", "s_none"]


def cohort_tables(folder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The scans and flags of COHORT, each measured scan with a small real PNG preview in ``folder``."""
    scans, flags = [], []
    for k, (subject, score, status, scan_flags) in enumerate(COHORT):
        preview = ""
        if not status:
            preview = f"{subject}.png"
            Image.new("RGB", (60, 20), (40 * k, 100, 200 - 30 * k)).save(folder / preview)
        scans.append({"subject": subject, "score": score, "preview": preview, "status": status, "age": 50 + k})
        flags += [{"subject": subject, "structure": s, "flag": f, "detail": d} for s, f, d in scan_flags]
    return pd.DataFrame(scans), pd.DataFrame(flags)


@pytest.fixture
def page(tmp_path):
    scans, flags = cohort_tables(tmp_path)
    path = tmp_path / "review.html"
    write_review_page(scans, flags, path, title=f"test review {NASTY}")
    return path


# --- the HTML, without a browser ------------------------------------------------------------------------------


class Elements(HTMLParser):
    """Start tags (name, attributes) and the text of each <script> and <h2>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.texts, self.current = [], {"script": [], "h2": []}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.current = tag if tag in self.texts else None

    def handle_data(self, data):
        if self.current:
            self.texts[self.current].append(data)

    def handle_endtag(self, tag):
        self.current = None


def test_review_order_puts_no_score_last_and_ties_by_subject(tmp_path):
    scans, _ = cohort_tables(tmp_path)
    assert review_order(scans)["subject"].tolist() == ORDER


def test_page_holds_the_cards_in_order_and_survives_script_text(page):
    text = page.read_text()
    elements = Elements(text)
    cards = [a for tag, a in elements.tags if tag == "article"]
    assert [a["data-subject"] for a in cards] == ORDER
    assert [a["data-score"] for a in cards][:2] == ["9.0", "4.0"]
    # '</script><b>' in a title and a flag detail: escaped, not markup; the settings JSON intact
    assert sum(tag == "b" for tag, _ in elements.tags) == sum(tag == "li" for tag, _ in elements.tags)
    assert text.count("<b>bold</b>") == 0 and text.count("&lt;/script&gt;&lt;b&gt;bold") == 3  # title, h1, detail
    settings = json.loads(elements.texts["script"][0])
    assert settings["title"] == f"test review {NASTY}" and settings["columns"] == DECISION_COLUMNS
    assert elements.texts["h2"] == ORDER
    previews = [a for tag, a in elements.tags if tag == "img" and "preview" in a.get("class", "")]
    assert len(previews) == 5 and all(a["loading"] == "lazy" and a["width"] and a["height"] for a in previews)


def test_a_subject_is_text_wherever_it_appears(tmp_path):
    subject = f'a"b {NASTY}'
    scans = pd.DataFrame([{"subject": subject, "score": 1.0, "preview": "p#1.png", "status": ""}])
    flags = pd.DataFrame([{"subject": subject, "structure": NASTY, "flag": NASTY, "detail": ""}])
    write_review_page(scans, flags, tmp_path / "r.html")
    elements = Elements((tmp_path / "r.html").read_text())
    attributes = {tag: a for tag, a in elements.tags if tag in ("article", "img", "li") and a.get("alt") != ""}
    assert attributes["article"]["data-subject"] == subject and attributes["li"]["data-structure"] == NASTY
    assert attributes["img"]["src"] == "p%231.png" and elements.texts["h2"] == [subject]


def test_page_fetches_nothing_from_elsewhere(page):
    text = page.read_text()
    fetching = r"(?i)\b(https?|ftp|data):|<link|@import|(?<![.\w])url\(|@font-face|\bfetch\(|XMLHttpRequest|import\("
    assert not re.search(fetching, text)
    sources = [a["src"] for tag, a in Elements(text).tags if "src" in a]
    assert sources == [f"{s}.png" for s in ORDER if s != "s_none"]  # no <script src>, only the previews


def test_page_refuses_flags_of_unknown_scans_and_repeated_subjects(tmp_path):
    scans, flags = cohort_tables(tmp_path)
    stray = pd.concat([flags, pd.DataFrame([{"subject": "nobody", "structure": "", "flag": "x", "detail": ""}])])
    with pytest.raises(ValueError, match="nobody"):
        write_review_page(scans, stray, tmp_path / "r.html")
    with pytest.raises(ValueError, match="listed twice"):
        write_review_page(pd.concat([scans, scans.head(1)]), flags, tmp_path / "r.html")
    with pytest.raises(ValueError, match="missing column"):
        write_review_page(scans.drop(columns="preview"), flags, tmp_path / "r.html")


def write_tsv(tmp_path, *lines: str):
    path = tmp_path / "decisions.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_decisions_reads_a_hand_written_file(tmp_path):
    path = write_tsv(
        tmp_path,
        "subject\tstructure\tdecision\treason\tnote",
        "s1\t\texclude\tmotion\tx",
        "",
        "s2\tliver\tAccept",
        "s2\tliver\taccept\tagain",
    )
    table = read_decisions(path)
    assert list(table.columns) == DECISION_COLUMNS
    assert table.values.tolist() == [["s1", "", "exclude", "motion"], ["s2", "liver", "accept", ""]]
    assert read_decisions(write_tsv(tmp_path, "\t".join(DECISION_COLUMNS))).empty


@pytest.mark.parametrize(
    "lines, message",
    [
        (["subject,structure,decision,reason", "s1,,exclude,"], "line 1: missing column"),
        (["subject\tstructure\treason", "s1\t\t"], r"missing column\(s\) \['decision'\]"),
        (["subject\tstructure\tdecision\treason", "s1\t\texclude\t", "s2\t\tdrop\t"], "line 3: decision 'drop'"),
        (["subject\tstructure\tdecision\treason", "", "\tliver\texclude\t"], "line 3: empty subject"),
        (["subject\tstructure\tdecision\treason", "s1\t\texclude\ta\tb"], "line 2: 5 fields"),
        (
            ["subject\tstructure\tdecision\treason", "s1\tliver\texclude", "s1\tliver\taccept"],
            "line 3: accept contradicts line 2",
        ),
    ],
)
def test_read_decisions_names_the_bad_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_decisions(write_tsv(tmp_path, *lines))


# --- the page in a real browser -------------------------------------------------------------------------------


def shown(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).map(c => c.dataset.subject)"
    )


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def test_cards_in_score_order_and_filters(browser, page):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.open(page)
    driver = browser.driver
    assert (
        driver.execute_script("return Array.from(document.querySelectorAll('[data-subject]'), e => e.dataset.subject)")
        == ORDER
    )
    assert (
        NASTY in driver.find_element(By.CSS_SELECTOR, '[data-subject="s_high"] li[data-structure="kidney_left"]').text
    )
    choose(driver, "flag-filter", "volume_outlier")
    assert shown(driver) == ["s_high", "s_mid"]
    assert driver.find_element(By.ID, "count").text == "2"
    choose(driver, "structure-filter", "liver")  # volume_outlier *of the liver*
    assert shown(driver) == ["s_high"]
    choose(driver, "flag-filter", "*")
    assert shown(driver) == ["s_high", "s_mid"]
    choose(driver, "structure-filter", "")  # flags of the whole scan
    assert shown(driver) == ["s_high", "s_none"]
    choose(driver, "structure-filter", "*")
    assert shown(driver) == ORDER and driver.find_element(By.ID, "count").text == str(len(ORDER))


def test_larger_view_and_keys(browser, page):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.open(page)
    driver = browser.driver
    overlay = driver.find_element(By.ID, "overlay")
    driver.find_element(By.CSS_SELECTOR, '[data-subject="s_mid"] img.preview').click()
    assert overlay.is_displayed()
    assert overlay.find_element(By.TAG_NAME, "img").get_attribute("src").endswith("/s_mid.png")
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    assert not overlay.is_displayed()

    def selected():
        return driver.execute_script("return document.querySelector('.card.selected').dataset.subject")

    assert selected() == "s_mid"  # the click selected it
    keys = ActionChains(driver)
    keys.send_keys("j").perform()
    assert selected() == "s_tie_a"
    keys.send_keys(Keys.ARROW_DOWN).perform()
    assert selected() == "s_tie_b"
    keys.send_keys("k").perform()
    assert selected() == "s_tie_a"
    choose(driver, "flag-filter", "volume_outlier")  # the selection moves over visible cards only
    driver.execute_script("document.activeElement.blur()")
    keys.send_keys("j").perform()
    assert selected() == "s_high"
    keys.send_keys("j").perform()
    keys.send_keys("j").perform()
    assert selected() == "s_mid"
    keys.send_keys(Keys.ENTER).perform()
    assert overlay.is_displayed()
    overlay.click()
    assert not overlay.is_displayed()
    keys.send_keys("x").perform()
    assert "exclude" in driver.find_element(By.CSS_SELECTOR, '[data-subject="s_mid"]').get_attribute("class")


def test_decisions_download_as_tsv_and_survive_a_reload(browser, page):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.open(page)
    driver = browser.driver

    def click(selector):
        driver.find_element(By.CSS_SELECTOR, selector).click()

    reason = driver.find_element(By.CSS_SELECTOR, '[data-subject="s_high"] .reason')
    # a tab would split the TSV line (a text input itself drops line breaks)
    driver.execute_script("arguments[0].value = 'cut off\\tat the top'", reason)
    click('[data-subject="s_high"] .scan-decision .exclude')
    click('[data-subject="s_mid"] li[data-structure="liver"] .exclude')
    click('[data-subject="s_mid"] li[data-structure="spleen"] .accept')
    click('[data-subject="s_low"] .scan-decision .accept')
    click('[data-subject="s_low"] .scan-decision .accept')  # taken back
    assert driver.find_element(By.ID, "decided").text == "3 decisions"
    click("#download")
    expected = [
        ["s_high", "", "exclude", "cut off at the top"],
        ["s_mid", "liver", "exclude", ""],
        ["s_mid", "spleen", "accept", ""],
    ]
    downloaded = browser.wait_for_download(DECISIONS_FILE)
    assert downloaded.read_text().splitlines()[0] == "subject\tstructure\tdecision\treason"
    assert read_decisions(downloaded).values.tolist() == expected

    driver.refresh()  # kept in the browser (localStorage)
    assert driver.find_element(By.ID, "decided").text == "3 decisions"
    assert "exclude" in driver.find_element(By.CSS_SELECTOR, '[data-subject="s_high"]').get_attribute("class")
    assert "accept" in driver.find_element(
        By.CSS_SELECTOR, '[data-subject="s_mid"] li[data-structure="spleen"]'
    ).get_attribute("class")


def test_loading_an_earlier_decisions_file(browser, page, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    earlier = write_tsv(
        tmp_path, "\t".join(DECISION_COLUMNS), "s_tie_a\tkidney_right\texclude\tswapped", "s_low\t\taccept\t"
    )
    browser.open(page)
    driver = browser.driver
    driver.find_element(By.ID, "load").send_keys(str(earlier))
    WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "decided").text == "2 decisions")
    driver.find_element(By.ID, "download").click()
    assert read_decisions(browser.wait_for_download(DECISIONS_FILE)).values.tolist() == [
        ["s_tie_a", "kidney_right", "exclude", "swapped"],
        ["s_low", "", "accept", ""],
    ]
