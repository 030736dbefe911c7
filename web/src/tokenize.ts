// Tokenisation with Hugging Face's tokenizers.js reading the package's tokenizer.json (no hand-written WordPiece).
// tokenizers.js has no truncation option; Python truncates (transformers, truncation=True) the word pieces to
// max_length minus the special tokens and then adds them, which is what `encode` does for a text that is too long.
import { Tokenizer } from "@huggingface/tokenizers";

export interface Encoded { ids: number[]; types: number[] }

export class TextTokenizer {
  private tokenizer: Tokenizer;

  constructor(tokenizerJson: object, tokenizerConfig: object, readonly maxLength: number) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
  }

  encode(text: string, pair: string | null = null): Encoded {
    const full = this.tokenizer.encode(text, { text_pair: pair, return_token_type_ids: true });
    if (full.ids.length <= this.maxLength) return { ids: full.ids, types: full.token_type_ids };
    // too long: cut the word pieces (longest member of a pair first), keep the special tokens around them
    const a = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    const b = pair === null ? null : this.tokenizer.encode(pair, { add_special_tokens: false }).ids;
    const specials = full.ids.length - a.length - (b?.length ?? 0);
    const budget = this.maxLength - specials;
    if (b === null) {
      const ids = [...full.ids.slice(0, 1), ...a.slice(0, budget), ...full.ids.slice(1 + a.length)];
      return { ids, types: new Array(ids.length).fill(0) };
    }
    // Hugging Face's "longest_first": the shorter member keeps at most half the budget (rounded down), the
    // longer one (the second on a tie) the rest
    const bLonger = b.length >= a.length;
    let long = bLonger ? b.length : a.length, short = bLonger ? a.length : b.length;
    short = Math.min(short, Math.floor(budget / 2));
    long = Math.min(long, budget - short);
    const na = bLonger ? short : long, nb = bLonger ? long : short;
    const cls = full.ids[0], sep = full.ids[full.ids.length - 1];
    const ids = [cls, ...a.slice(0, na), sep, ...b.slice(0, nb), sep];
    const types = [...new Array(na + 2).fill(0), ...new Array(nb + 1).fill(1)];
    return { ids, types };
  }
}
