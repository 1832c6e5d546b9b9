"""A small synthetic char-tagged (BIO) NER corpus, MSRA-like, for tests that must not download."""

from __future__ import annotations

import random

PEOPLE = ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨帆", "赵磊", "黄敏"]
PLACES = ["北京", "上海", "广州", "深圳", "杭州", "南京", "武汉", "成都"]
ORGS = ["新华社", "清华大学", "人民银行", "国家统计局", "北京大学", "中国银行"]
FILLERS = ["今天", "昨天", "在", "访问了", "会见", "表示", "发展", "经济", "问题", "工作", "会议", "已经", "取得", "进展"]


def synthetic_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Sentences as (char, BIO tag) pairs; about 40% have no entity, like MSRA."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        pairs: list[tuple[str, str]] = []
        with_entities = rng.random() > 0.4
        for _ in range(rng.randint(4, 9)):
            kind = rng.random() if with_entities else 1.0
            if kind < 0.2:
                word, tag = rng.choice(PEOPLE), "PER"
            elif kind < 0.4:
                word, tag = rng.choice(PLACES), "LOC"
            elif kind < 0.5:
                word, tag = rng.choice(ORGS), "ORG"
            else:
                word, tag = rng.choice(FILLERS), None
            for i, ch in enumerate(word):
                pairs.append((ch, "O" if tag is None else ("B-" if i == 0 else "I-") + tag))
        pairs.append(("。", "O"))
        sentences.append(pairs)
    return sentences


def write_bio(path: str, sentences: list[list[tuple[str, str]]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for sentence in sentences:
            for ch, tag in sentence:
                f.write(f"{ch}\t{tag}\n")
            f.write("\n")
    return path
