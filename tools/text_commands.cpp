#include "text_commands.hpp"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/clip_tokenizer.hpp"

namespace gmi::cli {
namespace {

using nlohmann::json;

// Texts may hold invalid UTF-8 (they come from argv): shown with U+FFFD, never an exception.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

struct TextCommands::State {
  CLI::App* tokenize = nullptr;
  std::string vocab;
  int context = ClipTokenizer::kContextLength;
  bool json_out = false;
  std::vector<std::string> texts;

  int run_tokenize() const {
    const ClipTokenizer tok = ClipTokenizer::from_file(vocab);
    if (!json_out) std::printf("%5s  %-40s  %s\n", "count", "text", "ids");
    for (const auto& text : texts) {
      const std::vector<int> ids = tok.encode_with_specials(text, context);
      if (json_out) {
        nlohmann::ordered_json line{{"text", text}, {"ids", ids}};
        std::cout << line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
        continue;
      }
      std::string shown = dump(json(text));  // quoted and escaped: tabs and newlines stay on the row
      std::string id_list;
      for (int id : ids) {
        if (!id_list.empty()) id_list += ' ';
        id_list += std::to_string(id);
      }
      // Pad to 40 characters, not bytes (a UTF-8 continuation byte is no character).
      const auto chars = std::count_if(shown.begin(), shown.end(), [](char c) { return (c & 0xC0) != 0x80; });
      if (chars < 40) shown.append(static_cast<size_t>(40 - chars), ' ');
      std::printf("%5zu  %s  %s\n", ids.size(), shown.c_str(), id_list.c_str());
    }
    std::cout.flush();
    return 0;
  }
};

TextCommands::TextCommands(CLI::App& app) : state_(std::make_unique<State>()) {
  State& s = *state_;
  auto* text = app.add_subcommand("text", "text tools for CLIP text encoders");
  text->require_subcommand(1);
  s.tokenize = text->add_subcommand(
      "tokenize", "print the CLIP BPE token ids of each TEXT (start and end included)");
  s.tokenize->add_option("--vocab", s.vocab,
                         "CLIP merges file, gzipped or plain (e.g. bpe_simple_vocab_16e6.txt.gz)")
      ->required();
  s.tokenize->add_option("--context", s.context, "truncate to this many ids, the last one end (0: keep all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  s.tokenize->add_flag("--json", s.json_out, "one JSON line per text: {\"text\": ..., \"ids\": [...]}");
  s.tokenize->add_option("texts", s.texts, "the texts (put -- before a text that starts with -)")->required();
}

TextCommands::~TextCommands() = default;

int TextCommands::run() {
  const State& s = *state_;
  if (s.tokenize->parsed()) return s.run_tokenize();
  return -1;
}

}  // namespace gmi::cli
