#pragma once
/// Routes as data: the stages a job runs through, in order, from routes.query /
/// routes.upload. A route is checked once, when the broker starts, and stored with each job
/// it accepts, so that a restarted broker resumes a job on the route it was accepted with.
/// Thread-safety: pure functions.
#include <string>
#include <vector>

namespace gmi {

using Route = std::vector<std::string>;

/// "decode,embed,spec" -> {"decode", "embed", "spec"} (spaces around names ignored).
Route split_route(const std::string& text);
/// {"decode", "embed"} -> "decode,embed".
std::string join_route(const Route& route);

/// Checks a route for `kind` ("query" | "upload"), given the interrogator the interrogate
/// stage runs. Throws InputError naming `key` (e.g. "routes.query") and the rule broken:
///   - known stage names (decode, interrogate, embed, score, spec), none twice;
///   - decode first; a query ends in score, an upload in spec; score only on queries, spec
///     only on uploads, and embed on both;
///   - a query's interrogate (if any) after embed for the embedding-based interrogators
///     (neighbour, ridge, prompt-bank) and before embed for the captioner, which also needs
///     interrogate on the route: decode,interrogate,embed,score.
void validate_route(const std::string& key, const std::string& kind, const Route& route,
                    const std::string& interrogator);

}  // namespace gmi
