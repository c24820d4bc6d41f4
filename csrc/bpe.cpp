// The byte-pair merge loop of qlora_fast.tokenizer.BPETokenizer, as `qlora_fast._bpe`.
//
// For GPT-2's and cl100k's patterns the text is split here too, by a hand-written scanner that
// follows the regex alternatives in order (possessive quantifiers mean no backtracking except
// where noted) over a per-code-point class table (letter / number / whitespace) that Python builds
// from the `regex` module, so the classes are exactly the regex's. Other patterns are split in
// Python with `regex` and the list of pieces is handed here.
// Each piece is looked up whole, then in a cache, and only then merged: tiktoken's algorithm,
// which keeps the parts' boundaries and the rank of each adjacent pair's concatenation and
// repeatedly merges the lowest-ranked pair (leftmost on a tie), O(n * merges) per piece.
// Memory traffic is one pass over the UTF-8 of each piece plus hash lookups; the output list
// of ids is built once. `train` learns merges with incremental pair counts and a lazy heap
// ordered by (highest count, lexicographically smallest (left bytes, right bytes)), the same
// rule as the pure-Python trainer.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <queue>
#include <stdexcept>
#include <tuple>
#include <functional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using Rank = uint32_t;
constexpr Rank kNoRank = std::numeric_limits<Rank>::max();
constexpr size_t kCacheLimit = 1 << 18;
constexpr size_t kLongPiece = 128;  // pieces longer than this (bytes) use the heap-based merge

// Code-point classes, filled by set_char_classes().
constexpr uint8_t kLetter = 1, kNumber = 2, kSpace = 4;
std::vector<uint8_t> g_classes;

enum Pattern { kGpt2 = 1, kCl100k = 2 };

inline uint8_t cls(uint32_t c) { return c < g_classes.size() ? g_classes[c] : 0; }
inline bool is_letter(uint32_t c) { return cls(c) & kLetter; }
inline bool is_number(uint32_t c) { return cls(c) & kNumber; }
inline bool is_space(uint32_t c) { return cls(c) & kSpace; }
inline bool is_other(uint32_t c) { return !(cls(c) & (kLetter | kNumber | kSpace)); }  // [^\s\p{L}\p{N}]
inline bool is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

// Decode valid UTF-8 (Python produced it) into code points and their byte offsets (+ end).
void decode_utf8(const unsigned char* s, size_t len, std::vector<uint32_t>& cps, std::vector<size_t>& offs) {
  cps.clear();
  offs.clear();
  for (size_t i = 0; i < len;) {
    unsigned char b = s[i];
    uint32_t c;
    size_t n;
    if (b < 0x80) { c = b; n = 1; }
    else if (b < 0xE0) { c = b & 0x1F; n = 2; }
    else if (b < 0xF0) { c = b & 0x0F; n = 3; }
    else { c = b & 0x07; n = 4; }
    for (size_t k = 1; k < n; ++k) c = (c << 6) | (s[i + k] & 0x3F);
    cps.push_back(c);
    offs.push_back(i);
    i += n;
  }
  offs.push_back(len);
}

// '(?:[sdmt]|ll|ve|re) with or without case folding; returns the match length in code points or 0.
size_t contraction(const std::vector<uint32_t>& c, size_t i, bool ignore_case) {
  size_t n = c.size();
  if (c[i] != '\'' || i + 1 >= n) return 0;
  auto lower = [&](uint32_t x) -> uint32_t {
    if (!ignore_case) return x;
    if (x == 0x17F) return 's';  // LATIN SMALL LETTER LONG S folds to 's'
    return (x >= 'A' && x <= 'Z') ? x + 32 : x;
  };
  uint32_t a = lower(c[i + 1]);
  if (a == 's' || a == 'd' || a == 'm' || a == 't') return 2;
  if (i + 2 < n) {
    uint32_t b = lower(c[i + 2]);
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return 3;
  }
  return 0;
}

// End (exclusive) of the whitespace run starting at i.
size_t space_run_end(const std::vector<uint32_t>& c, size_t i) {
  while (i < c.size() && is_space(c[i])) ++i;
  return i;
}

// End of the piece starting at i for cl100k's pattern:
// '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
size_t next_cl100k(const std::vector<uint32_t>& c, size_t i) {
  const size_t n = c.size();
  if (size_t m = contraction(c, i, true)) return i + m;
  {  // optional non-letter/number/newline, then letters (possessive: no retry without it)
    size_t j = i;
    if (!is_letter(c[j]) && !is_number(c[j]) && !is_newline(c[j])) ++j;
    if (j < n && is_letter(c[j])) {
      while (j < n && is_letter(c[j])) ++j;
      return j;
    }
  }
  if (is_number(c[i])) {
    size_t j = i;
    while (j < n && j < i + 3 && is_number(c[j])) ++j;
    return j;
  }
  {  // ' ?' may back off, so a space counts only when "other" characters follow it
    size_t j = (c[i] == ' ' && i + 1 < n && is_other(c[i + 1])) ? i + 1 : i;
    if (is_other(c[j])) {
      while (j < n && is_other(c[j])) ++j;
      while (j < n && is_newline(c[j])) ++j;
      return j;
    }
  }
  const size_t k = space_run_end(c, i);  // c[i] is whitespace from here on
  if (k == n) return n;                  // \s++$
  for (size_t m = k; m > i; --m) {       // \s*[\r\n]: up to the run's last newline
    if (is_newline(c[m - 1])) return m;
  }
  if (k - i >= 2) return k - 1;  // \s+(?!\S): leave the last space to the next piece
  return i + 1;                  // \s
}

// End of the piece starting at i for GPT-2's pattern:
// '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
size_t next_gpt2(const std::vector<uint32_t>& c, size_t i) {
  const size_t n = c.size();
  if (size_t m = contraction(c, i, false)) return i + m;
  for (auto in_class : {is_letter, is_number, is_other}) {
    size_t j = (c[i] == ' ' && i + 1 < n && in_class(c[i + 1])) ? i + 1 : i;
    if (in_class(c[j])) {
      while (j < n && in_class(c[j])) ++j;
      return j;
    }
  }
  const size_t k = space_run_end(c, i);
  if (k == n) return n;
  if (k - i >= 2) return k - 1;
  return i + 1;
}

class Encoder {
 public:
  explicit Encoder(py::dict ranks) {
    encoder_.reserve(ranks.size() * 2);
    for (auto item : ranks) {
      encoder_.emplace(item.first.cast<std::string>(), item.second.cast<Rank>());
    }
  }

  // Ids of one piece of bytes merged as a unit.
  std::vector<Rank> merge(const std::string& piece) const {
    std::vector<Rank> out;
    merge_into(piece, out);
    return out;
  }

  py::list encode_pieces(py::list pieces) {
    std::vector<Rank> ids;
    ids.reserve(PyList_GET_SIZE(pieces.ptr()) * 2);
    std::string key;
    for (Py_ssize_t i = 0, n = PyList_GET_SIZE(pieces.ptr()); i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(pieces.ptr(), i);
      Py_ssize_t len = 0;
      const char* data = PyUnicode_AsUTF8AndSize(obj, &len);
      if (data == nullptr) throw py::error_already_set();  // e.g. UnicodeEncodeError on a lone surrogate
      key.assign(data, static_cast<size_t>(len));
      append_piece(key, ids);
    }
    return to_list(ids);
  }

  // Split `text` with the built-in scanner for `pattern` (1: GPT-2, 2: cl100k) and encode it.
  py::list encode_ordinary(py::str text, int pattern) {
    if (g_classes.empty()) throw std::runtime_error("set_char_classes() must be called before encode_ordinary()");
    if (pattern != kGpt2 && pattern != kCl100k) throw py::value_error("pattern must be 1 (gpt2) or 2 (cl100k)");
    Py_ssize_t len = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &len);
    if (data == nullptr) throw py::error_already_set();  // lone surrogates: Python replaces and retries
    decode_utf8(reinterpret_cast<const unsigned char*>(data), static_cast<size_t>(len), cps_, offs_);
    std::vector<Rank> ids;
    ids.reserve(static_cast<size_t>(len) / 3 + 1);
    std::string key;
    for (size_t i = 0; i < cps_.size();) {
      size_t j = pattern == kCl100k ? next_cl100k(cps_, i) : next_gpt2(cps_, i);
      key.assign(data + offs_[i], offs_[j] - offs_[i]);
      append_piece(key, ids);
      i = j;
    }
    return to_list(ids);
  }

  py::list encode_piece(py::bytes piece) {
    std::string s = piece;
    std::vector<Rank> ids;
    merge_into(s, ids);
    return to_list(ids);
  }

 private:
  static py::list to_list(const std::vector<Rank>& ids) {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
    if (list == nullptr) throw py::error_already_set();
    for (size_t i = 0; i < ids.size(); ++i) {
      PyObject* v = PyLong_FromUnsignedLong(ids[i]);
      if (v == nullptr) {
        Py_DECREF(list);
        throw py::error_already_set();
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
    }
    return py::reinterpret_steal<py::list>(list);
  }

  // Ids of one piece: the whole piece as a token, a cached result, or the merge loop.
  void append_piece(const std::string& key, std::vector<Rank>& ids) {
    auto whole = encoder_.find(key);
    if (whole != encoder_.end()) {
      ids.push_back(whole->second);
      return;
    }
    auto hit = cache_.find(key);
    if (hit != cache_.end()) {
      ids.insert(ids.end(), hit->second.begin(), hit->second.end());
      return;
    }
    std::vector<Rank> merged;
    merge_into(key, merged);
    ids.insert(ids.end(), merged.begin(), merged.end());
    if (cache_.size() >= kCacheLimit) cache_.clear();
    cache_.emplace(key, std::move(merged));
  }

  Rank rank_of(const std::string& piece, size_t start, size_t end) const {
    auto it = encoder_.find(piece.substr(start, end - start));
    return it == encoder_.end() ? kNoRank : it->second;
  }

  // The same merges as the loop below in O(n log n): parts in a linked list (a part is named by
  // its first byte), candidate pairs in a min-heap keyed (rank, start) so the lowest rank wins and
  // the leftmost on a tie, stale entries skipped by a per-part generation count. Used for long
  // pieces, where the quadratic loop would take seconds (e.g. 40k letters without a space).
  void merge_long(const std::string& piece, std::vector<Rank>& out) const {
    const size_t n = piece.size();
    std::vector<size_t> next(n), prev(n);
    std::vector<uint32_t> gen(n, 0);
    std::vector<char> alive(n, 1);
    for (size_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i == 0 ? n : i - 1;  // n: no previous part
    }
    auto pair_rank = [&](size_t i) -> Rank {
      size_t j = next[i];
      return j >= n ? kNoRank : rank_of(piece, i, next[j]);
    };
    using Entry = std::tuple<Rank, size_t, uint32_t>;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    for (size_t i = 0; i + 1 < n; ++i) {
      Rank r = pair_rank(i);
      if (r != kNoRank) heap.emplace(r, i, 0u);
    }
    auto refresh = [&](size_t i) {
      ++gen[i];
      Rank r = pair_rank(i);
      if (r != kNoRank) heap.emplace(r, i, gen[i]);
    };
    while (!heap.empty()) {
      auto [r, i, g] = heap.top();
      heap.pop();
      if (!alive[i] || gen[i] != g) continue;
      size_t j = next[i];
      alive[j] = 0;
      next[i] = next[j];
      if (next[j] < n) prev[next[j]] = i;
      refresh(i);
      if (prev[i] < n) refresh(prev[i]);
    }
    for (size_t i = 0; i < n; i = next[i]) {
      auto it = encoder_.find(piece.substr(i, next[i] - i));
      if (it == encoder_.end()) throw py::value_error("a single byte is missing from the ranks");
      out.push_back(it->second);
    }
  }

  void merge_into(const std::string& piece, std::vector<Rank>& out) const {
    if (piece.empty()) return;
    auto whole = encoder_.find(piece);
    if (whole != encoder_.end()) {
      out.push_back(whole->second);
      return;
    }
    if (piece.size() > kLongPiece) {
      merge_long(piece, out);
      return;
    }
    // parts[i] = (start of part i, rank of merging part i with part i + 1).
    std::vector<std::pair<size_t, Rank>> parts;
    parts.reserve(piece.size() + 1);
    for (size_t i = 0; i + 1 < piece.size(); ++i) parts.emplace_back(i, rank_of(piece, i, i + 2));
    parts.emplace_back(piece.size() - 1, kNoRank);
    parts.emplace_back(piece.size(), kNoRank);
    auto pair_rank = [&](size_t i) {
      return i + 3 < parts.size() ? rank_of(piece, parts[i].first, parts[i + 3].first) : kNoRank;
    };
    while (parts.size() > 1) {
      Rank best = kNoRank;
      size_t best_i = 0;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        if (parts[i].second < best) {
          best = parts[i].second;
          best_i = i;
        }
      }
      if (best == kNoRank) break;
      if (best_i > 0) parts[best_i - 1].second = pair_rank(best_i - 1);
      parts[best_i].second = pair_rank(best_i);
      parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
    }
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = encoder_.find(piece.substr(parts[i].first, parts[i + 1].first - parts[i].first));
      if (it == encoder_.end()) throw py::value_error("a single byte is missing from the ranks");
      out.push_back(it->second);
    }
  }

  std::unordered_map<std::string, Rank> encoder_;
  std::unordered_map<std::string, std::vector<Rank>> cache_;
  std::vector<uint32_t> cps_;  // scratch buffers of encode_ordinary
  std::vector<size_t> offs_;
};

// ranges: list of (first code point, end code point, class bits) covering \p{L}, \p{N}, \s.
void set_char_classes(py::list ranges) {
  std::vector<uint8_t> table(0x110000, 0);
  for (auto item : ranges) {
    auto t = item.cast<py::tuple>();
    size_t a = t[0].cast<size_t>(), b = t[1].cast<size_t>();
    uint8_t bits = t[2].cast<uint8_t>();
    if (a > b || b > table.size()) throw py::value_error("set_char_classes: range outside [0, 0x110000]");
    for (size_t c = a; c < b; ++c) table[c] |= bits;
  }
  g_classes.swap(table);
}

// The pieces (as bytes) the built-in scanner cuts `text` into: for testing against the regex.
py::list split(py::str text, int pattern) {
  if (g_classes.empty()) throw std::runtime_error("set_char_classes() must be called before split()");
  Py_ssize_t len = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &len);
  if (data == nullptr) throw py::error_already_set();
  std::vector<uint32_t> cps;
  std::vector<size_t> offs;
  decode_utf8(reinterpret_cast<const unsigned char*>(data), static_cast<size_t>(len), cps, offs);
  py::list out;
  for (size_t i = 0; i < cps.size();) {
    size_t j = pattern == kCl100k ? next_cl100k(cps, i) : next_gpt2(cps, i);
    out.append(py::bytes(data + offs[i], offs[j] - offs[i]));
    i = j;
  }
  return out;
}

struct PairHash {
  size_t operator()(const std::pair<int32_t, int32_t>& p) const noexcept {
    return std::hash<uint64_t>()((static_cast<uint64_t>(static_cast<uint32_t>(p.first)) << 32) | static_cast<uint32_t>(p.second));
  }
};

// Merged tokens' bytes in merge order; same rule and same result as bpe._train_merges.
py::list train(py::list words, int64_t n_merges, py::object progress) {
  using Pair = std::pair<int32_t, int32_t>;
  std::vector<std::string> token_bytes;
  std::unordered_map<std::string, int32_t> by_bytes;
  for (int b = 0; b < 256; ++b) {
    token_bytes.emplace_back(1, static_cast<char>(b));
    by_bytes.emplace(token_bytes.back(), b);
  }
  std::vector<std::vector<int32_t>> symbols;
  std::vector<int64_t> freq;
  for (auto item : words) {
    auto tup = item.cast<py::tuple>();
    std::string w = tup[0].cast<std::string>();
    std::vector<int32_t> sym;
    sym.reserve(w.size());
    for (unsigned char c : w) sym.push_back(c);
    symbols.push_back(std::move(sym));
    freq.push_back(tup[1].cast<int64_t>());
  }
  std::unordered_map<Pair, int64_t, PairHash> pair_count;
  std::unordered_map<Pair, std::vector<int32_t>, PairHash> where;  // word ids, may hold stale/duplicate ids
  for (size_t wi = 0; wi < symbols.size(); ++wi) {
    const auto& sym = symbols[wi];
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      Pair p{sym[i], sym[i + 1]};
      pair_count[p] += freq[wi];
      auto& w = where[p];
      if (w.empty() || w.back() != static_cast<int32_t>(wi)) w.push_back(static_cast<int32_t>(wi));
    }
  }
  struct Entry {
    int64_t count;
    Pair pair;
  };
  // The heap's top is the highest count, then the smallest (left bytes, right bytes).
  auto worse = [&token_bytes](const Entry& x, const Entry& y) {
    if (x.count != y.count) return x.count < y.count;
    const std::string& xl = token_bytes[x.pair.first];
    const std::string& yl = token_bytes[y.pair.first];
    if (xl != yl) return xl > yl;
    return token_bytes[x.pair.second] > token_bytes[y.pair.second];
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(worse)> heap(worse);
  for (auto& kv : pair_count) heap.push({kv.second, kv.first});

  py::list merged;
  int64_t done = 0;
  std::vector<int32_t> out;
  std::unordered_set<Pair, PairHash> changed;
  while (done < n_merges && !heap.empty()) {
    Entry top = heap.top();
    heap.pop();
    auto found = pair_count.find(top.pair);
    if (found == pair_count.end() || found->second != top.count || top.count <= 0) continue;  // stale
    const int32_t a = top.pair.first, b = top.pair.second;
    std::string new_bytes = token_bytes[a] + token_bytes[b];
    int32_t fresh;
    auto existing = by_bytes.find(new_bytes);
    if (existing != by_bytes.end()) {
      fresh = existing->second;  // reachable from two splits: reuse the token, add no rank
    } else {
      fresh = static_cast<int32_t>(token_bytes.size());
      token_bytes.push_back(new_bytes);
      by_bytes.emplace(new_bytes, fresh);
      merged.append(py::bytes(new_bytes));
      ++done;
      if (!progress.is_none() && (done % 64 == 0 || done == n_merges)) progress(done);
    }
    changed.clear();
    std::vector<int32_t> affected = std::move(where[top.pair]);
    where.erase(top.pair);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    for (int32_t wi : affected) {
      auto& sym = symbols[wi];
      out.clear();
      for (size_t i = 0; i < sym.size();) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
          out.push_back(fresh);
          i += 2;
        } else {
          out.push_back(sym[i]);
          i += 1;
        }
      }
      if (out.size() == sym.size()) continue;
      const int64_t n = freq[wi];
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        Pair p{sym[i], sym[i + 1]};
        pair_count[p] -= n;
        changed.insert(p);
      }
      for (size_t i = 0; i + 1 < out.size(); ++i) {
        Pair p{out[i], out[i + 1]};
        pair_count[p] += n;
        auto& w = where[p];
        if (w.empty() || w.back() != wi) w.push_back(wi);
        changed.insert(p);
      }
      sym.swap(out);
    }
    for (const Pair& p : changed) {
      auto it = pair_count.find(p);
      if (it == pair_count.end()) continue;
      if (it->second <= 0) {
        pair_count.erase(it);
      } else if (p != top.pair) {
        heap.push({it->second, p});
      }
    }
    pair_count.erase(top.pair);
  }
  return merged;
}

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "Byte-pair merge loop and BPE trainer for qlora_fast.tokenizer.BPETokenizer";
  py::class_<Encoder>(m, "Encoder")
      .def(py::init<py::dict>(), py::arg("ranks"), "ranks: dict bytes -> rank")
      .def("encode_pieces", &Encoder::encode_pieces, py::arg("pieces"),
           "ids of a list of str pieces, each merged on its own (UTF-8 bytes)")
      .def("encode_piece", &Encoder::encode_piece, py::arg("piece"), "ids of one bytes piece merged as a unit")
      .def("encode_ordinary", &Encoder::encode_ordinary, py::arg("text"), py::arg("pattern"),
           "ids of text split by the built-in scanner (1: GPT-2 pattern, 2: cl100k pattern)");
  m.def("set_char_classes", &set_char_classes, py::arg("ranges"),
        "code-point class table from (start, end, bits) ranges; bits 1 letter, 2 number, 4 whitespace");
  m.def("split", &split, py::arg("text"), py::arg("pattern"), "the scanner's pieces of text, as bytes");
  m.def("train", &train, py::arg("words"), py::arg("n_merges"), py::arg("progress") = py::none(),
        "merged tokens' bytes in merge order from a list of (piece bytes, count); "
        "progress(merges_done) is called every 64 merges when given");
}
