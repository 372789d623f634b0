"""The umT5 tokenizer (sentencepiece / tokenizers), with the reference prompt cleaning."""
