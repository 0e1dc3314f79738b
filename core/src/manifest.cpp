#include "gmi/manifest.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>

#include "gmi/error.hpp"

namespace gmi {

Manifest read_manifest(const std::filesystem::path& path, bool require_prompt, bool confine) {
  std::ifstream in(path);
  if (!in) throw IoError("cannot open manifest " + path.string() + ": " + std::strerror(errno));
  const std::filesystem::path base = path.parent_path();
  Manifest m;
  std::string text;
  int line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) {
      m.blank_lines.push_back(line);
      continue;
    }
    auto issue = [&](const std::string& msg) { m.issues.push_back({line, msg}); };
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      issue("not valid JSON");
      continue;
    }
    if (!j.is_object()) {
      issue("not a JSON object");
      continue;
    }
    auto img = j.find("image");
    if (img == j.end() || !img->is_string() || img->get<std::string>().empty()) {
      issue("missing or non-string \"image\"");
      continue;
    }
    auto prompt = j.find("prompt");
    if (prompt != j.end() && !prompt->is_string()) {
      issue("\"prompt\" is not a string");
      continue;
    }
    if (require_prompt && (prompt == j.end() || prompt->get<std::string>().empty())) {
      issue("missing or empty \"prompt\"");
      continue;
    }
    std::filesystem::path rel = img->get<std::string>();
    if (confine) {
      bool escapes = rel.is_absolute();
      for (const auto& part : rel)
        if (part == "..") escapes = true;
      if (escapes) {
        issue("image path '" + rel.string() + "' leaves the manifest's directory");
        continue;
      }
    }
    ManifestEntry e;
    e.line = line;
    e.image = rel.is_absolute() ? rel : base / rel;
    e.prompt = prompt == j.end() ? std::string() : prompt->get<std::string>();
    e.fields = std::move(j);
    m.entries.push_back(std::move(e));
  }
  return m;
}

}  // namespace gmi
