"""Engines: parsing saved-format pages and the mirror, paging, URL-encoding, the registry."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from crawl.classes import parse_classes
from crawl.download import Fetcher, HttpLimits
from crawl.sources import SOURCES, SearchContext, SourceError, make_source, parse_bing_page
from demo.mirror import MirrorServer

from conftest import HostileServer, respond

LIMITS = HttpLimits(per_host_delay_s=0.0, retries=1, read_timeout_s=2.0, deadline_s=5.0)
SHIRT = parse_classes("T-shirt/top\n")[0]


def bing_item(murl: str) -> str:
    meta = html.escape(
        json.dumps({"murl": murl, "turl": "https://tse.example/th?id=1", "t": "x"}, separators=(",", ":"))
    )
    return f'<div class="imgpt"><a class="iusc" m="{meta}" href="/images/search"><img src="t.jpg"></a></div>'


def test_registry_has_every_engine() -> None:
    assert set(SOURCES) == {"bing", "baidu", "google", "flickr", "greedy", "urls", "mirror"}
    with pytest.raises(SourceError, match="unknown engine 'yahoo'"):
        make_source("yahoo", SearchContext(Fetcher(LIMITS)))


def test_bing_parser_keeps_every_image_link_not_only_jpg() -> None:
    urls = [
        "https://a.example/1.jpg",
        "https://b.example/2.png",
        "https://c.example/3.webp",
        "https://d.example/photo?id=4",  # no extension at all
        "https://e.example/5.JPEG",
    ]
    page = (
        "<html><body>" + "".join(bing_item(u) for u in urls) + '<div class="imgpt"><a>no meta</a></div></body></html>'
    )
    assert parse_bing_page(page.encode()) == urls
    # icrawler's own parser keeps only the .jpg link: the reason we have our own
    from icrawler.builtin.bing import BingParser

    ic = BingParser(1, None, None)
    assert [d["file_url"] for d in ic.parse(type("R", (), {"content": page.encode()})())] == [urls[0]]


def test_bing_source_url_encodes_the_query_and_pages(hostile: HostileServer) -> None:
    seen: list[dict[str, list[str]]] = []

    def page(sock, req):  # type: ignore[no-untyped-def]
        qs = parse_qs(urlsplit(req["path"]).query)
        seen.append(qs)
        first = int(qs["first"][0])
        items = [bing_item(f"https://img.example/{first + i}.png") for i in range(35)] if first < 70 else []
        respond(200, ("<html>" + "".join(items) + "</html>").encode(), {"Content-Type": "text/html"})(sock, req)

    for first in (0, 35, 70):
        q = "T-shirt%2Ftop+%26+more+%23x"
        hostile.routes[f"/images/async?q={q}&first={first}&count=35&mmasync=1"] = page
    src = make_source("bing", SearchContext(Fetcher(LIMITS), bing_base_url=hostile.base))
    urls = src.search(SHIRT, "T-shirt/top & more #x", 1000)
    assert len(urls) == 70 and urls[0] == "https://img.example/0.png"
    assert seen[0]["q"] == ["T-shirt/top & more #x"]  # decoded by the server exactly as sent
    assert [s["first"] for s in seen] == [["0"], ["35"], ["70"]]


def test_bing_source_stops_at_max_num(hostile: HostileServer) -> None:
    items = "".join(bing_item(f"https://img.example/{i}.jpg") for i in range(35))
    hostile.routes["/images/async?q=bag&first=0&count=35&mmasync=1"] = respond(200, items.encode())
    src = make_source("bing", SearchContext(Fetcher(LIMITS), bing_base_url=hostile.base))
    assert len(src.search(SHIRT, "bag", 10)) == 10
    assert len(hostile.log) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body><form action='/captcha'>Are you a robot?</form></body></html>",  # captcha
        b"<html><body><div class='consent'>Accept cookies</div></body></html>",  # consent
        b"",  # empty result
        b"<html><body><div class='img_cont'><img src='https://x/1.jpg'></div></body></html>",  # changed markup
    ],
)
def test_unusable_result_pages_give_zero_urls(hostile: HostileServer, body: bytes) -> None:
    hostile.routes["/images/async?q=bag&first=0&count=35&mmasync=1"] = respond(200, body, {"Content-Type": "text/html"})
    src = make_source("bing", SearchContext(Fetcher(LIMITS), bing_base_url=hostile.base))
    assert src.search(SHIRT, "bag", 50) == []


def test_failed_result_page_is_a_source_error(hostile: HostileServer) -> None:
    hostile.routes["/images/async?q=bag&first=0&count=35&mmasync=1"] = respond(503, b"", {"Content-Type": "text/html"})
    src = make_source("bing", SearchContext(Fetcher(LIMITS), bing_base_url=hostile.base))
    with pytest.raises(SourceError, match=r"engine bing: result page .* failed \(http_5xx\)"):
        src.search(SHIRT, "bag", 50)


def test_mirror_engine_runs_the_bing_parser_against_the_mirror(mirror: MirrorServer) -> None:
    ctx = SearchContext(Fetcher(LIMITS), mirror_base_url=mirror.base_url)
    src = make_source("mirror", ctx)
    urls = src.search(SHIRT, "T-shirt/top", 100)
    index = json.loads((mirror.world_dir / "index.json").read_text())
    expected = [f"{mirror.base_url}/{index['entries'][i]['path']}" for i in index["results"]["T-shirt/top"]]
    assert urls == expected
    other = src.search(SHIRT, "T-shirt/top photo", 100)
    assert sorted(other) == sorted(expected) and other != expected  # same pool, another ranking
    assert src.search(SHIRT, "spaceship", 100) == []


def test_mirror_engine_needs_a_running_mirror() -> None:
    with pytest.raises(SourceError, match="mirror is not running"):
        make_source("mirror", SearchContext(Fetcher(LIMITS)))


def baidu_encrypt(url: str) -> str:
    """Baidu's objURL obfuscation, the inverse of icrawler's ``BaiduParser._decode_url``."""
    from icrawler.builtin.baidu import BaiduParser

    parser = BaiduParser(1, None, None)
    probe = "abcdefghijklmnopqrstuvwxyz0123456789"
    inverse = {parser._decode_url(c): c for c in probe}
    out = "".join(inverse.get(c, c) for c in url)
    for token, plain in {"_z2C$q": ":", "_z&e3B": ".", "AzdH3F": "/"}.items():
        out = out.replace(plain, token)
    return out


def test_baidu_source_parses_the_json_format() -> None:
    enc = baidu_encrypt("https://img.example/a.jpg")
    data = {"data": [{"objURL": enc}, {"hoverURL": "https://img.example/b.png"}, {}]}
    src = make_source("baidu", SearchContext(Fetcher(LIMITS)))
    url = src.page_url("T恤 衫", 0)  # type: ignore[attr-defined]
    assert "word=T%E6%81%A4%20%E8%A1%AB" in url and "pn=0" in url
    page = type("P", (), {"content": json.dumps(data).encode(), "url": url})()
    assert src.parse(page) == ["https://img.example/a.jpg", "https://img.example/b.png"]  # type: ignore[attr-defined]


def test_google_source_tolerates_the_broken_parser() -> None:
    src = make_source("google", SearchContext(Fetcher(LIMITS)))
    assert "q=T-shirt%2Ftop" in src.page_url("T-shirt/top", 0)  # type: ignore[attr-defined]
    ok = b'<html><script>AF_initDataCallback({data:["https://img.example/x.jpg"]})</script></html>'
    page = type("P", (), {"content": ok, "url": "https://www.google.com/search"})()
    assert src.parse(page) == ["https://img.example/x.jpg"]  # type: ignore[attr-defined]
    nothing = type("P", (), {"content": b"<html><body>consent</body></html>", "url": "x"})()
    assert src.parse(nothing) == []  # type: ignore[attr-defined]


def test_flickr_needs_an_api_key() -> None:
    with pytest.raises(SourceError, match="engine flickr: no API key"):
        make_source("flickr", SearchContext(Fetcher(LIMITS)))
    src = make_source("flickr", SearchContext(Fetcher(LIMITS), flickr_api_key="k"))
    url = src.page_url("ankle boot", 100)  # type: ignore[attr-defined]
    assert "api_key=k" in url and "text=ankle+boot" in url and "page=2" in url


def test_urls_source_reads_a_tsv(tmp_path: Path) -> None:
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("t-shirt/top\thttps://a/1.jpg\nBag\thttps://b/2.jpg\nT-Shirt/Top\thttps://a/3.png\n# c\n")
    src = make_source("urls", SearchContext(Fetcher(LIMITS), urls_file=str(tsv)))
    assert src.search(SHIRT, "ignored", 10) == ["https://a/1.jpg", "https://a/3.png"]
    tsv.write_text("no tab here\n")
    with pytest.raises(SourceError, match="line 1: expected 'class<TAB>url'"):
        make_source("urls", SearchContext(Fetcher(LIMITS), urls_file=str(tsv)))


def test_greedy_source_crawls_within_the_site(hostile: HostileServer) -> None:
    base = hostile.base
    hostile.routes["/search?q=bag"] = respond(
        200,
        f'<html><img src="{base}/a.jpg"><a href="/page2.html">next</a><a href="https://elsewhere.example/x.html">x</a>'
        f"</html>".encode(),
        {"Content-Type": "text/html"},
    )
    hostile.routes["/page2.html"] = respond(
        200, f'<html><img src="{base}/b.png"></html>'.encode(), {"Content-Type": "text/html"}
    )
    limits = HttpLimits(**{**LIMITS.__dict__, "allow_hosts": (base.split("//")[1],)})  # a loopback "site"
    ctx = SearchContext(Fetcher(limits), greedy_domains=[f"{base}/search?q={{query}}"], greedy_max_pages=5)
    urls = make_source("greedy", ctx).search(SHIRT, "bag", 10)
    assert urls == [f"{base}/a.jpg", f"{base}/b.png"]
    assert {e["path"] for e in hostile.log} == {"/search?q=bag", "/page2.html"}


def urls_source(tsv: Path, classes: str | None = None) -> object:
    ctx = SearchContext(Fetcher(LIMITS), urls_file=str(tsv), classes=parse_classes(classes) if classes else None)
    return make_source("urls", ctx)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"Bag\thttps://a/1.jpg\nBag\thttps://a/x\ty.jpg\n", r"line 2: expected 'class<TAB>url', found 2 tabs"),
        (b"Bag\thttps://a/1.jpg\n\thttps://a/2.jpg\n", r"line 2: expected 'class<TAB>url', the class name is empty"),
        (b"Bag\t \n", r"line 1: expected 'class<TAB>url', the URL is empty"),
        (b"# c\nBag\thttps://a/1.jpg\nSac \xe0 main\thttps://a/2.jpg\n", r"line 3: not valid UTF-8 \(byte 0xe0"),
        (b"", r"no 'class<TAB>url' lines \(empty, or only comments\)"),
        (b"# only a comment\n\n  \n", r"no 'class<TAB>url' lines"),
        (b"Bag\tftp://a/1.jpg\nBag\twww.a.example/2.jpg\n", r"no http\(s\) URL on any line"),
    ],
)
def test_urls_source_rejects_a_broken_tsv_naming_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    tsv = tmp_path / "urls.tsv"
    tsv.write_bytes(content)
    with pytest.raises(SourceError, match=f"engine urls: {tsv}: {message}"):
        urls_source(tsv)


def test_urls_source_rejects_a_class_not_in_the_class_list(tmp_path: Path) -> None:
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("bag\thttps://a/1.jpg\nTrousers\thttps://a/2.jpg\n")
    with pytest.raises(SourceError, match=f"{tsv}: line 2: class 'Trousers' is not in the class list"):
        urls_source(tsv, "Bag\nTrouser")
    assert urls_source(tsv).search(parse_classes("Bag")[0], "", 10) == ["https://a/1.jpg"]  # no list: no check


def test_urls_source_skips_and_counts_unfetchable_and_repeated_urls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tsv = tmp_path / "urls.tsv"
    tsv.write_bytes(
        "\ufeffBag\thttps://a/1.jpg\r\nBag\tftp://a/2.jpg\r\nBAG\thttps://a/1.jpg\nBag\thttps://a/3.jpg\n".encode()
    )
    with caplog.at_level("WARNING", logger="crawl.sources"):
        src = urls_source(tsv, "Bag")
    assert src.search(parse_classes("Bag")[0], "", 10) == ["https://a/1.jpg", "https://a/3.jpg"]  # type: ignore[attr-defined]
    assert src.skipped == {"not_http": 1, "duplicate": 1}  # type: ignore[attr-defined]
    assert f"engine urls: {tsv}: 1 lines skipped (not_http): line 2" in caplog.text
