#pragma once
/// Ranking a hub's models against one query (or a batch) with every spec packed into
/// contiguous matrices: a query is one GEMV over all reduced points plus elementwise
/// passes; a batch of queries is one GEMM. See shared METHOD.md, "Identification".
/// Thread-safety: a built SpecIndex is immutable; rank*/score* are const and reentrant.
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/linalg.hpp"
#include "gmi/metric.hpp"
#include "gmi/spec.hpp"

namespace gmi {

enum class Scorer {
  kWeighted,    ///< prompt-weighted RKME MMD^2 (the method); ascending
  kRkme,        ///< unweighted RKME MMD^2 (w = beta); ascending
  kMean,        ///< cos(x_q, mean_m) (Modelverse first moment); descending
  kNearest,     ///< max_j k_x(zx_j, x_q); descending
  kPopularity,  ///< downloads; descending
};

const char* to_string(Scorer s);
/// "weighted" | "rkme" | "mean" | "nearest" | "popularity"; throws InputError otherwise.
Scorer parse_scorer(std::string_view name);
/// True when lower scores rank first.
bool ascending(Scorer s);

struct ScoreOptions {
  Scorer scorer = Scorer::kWeighted;
  double tau = 0.5;  ///< prompt-weight temperature (weighted scorer only; chosen on the evaluation hubs)
  int top_k = 10;    ///< <= 0 means all models
};

struct RankedModel {
  std::string model;
  double score = 0;
};

/// Which space the specs given to a SpecIndex are in.
enum class SpecSpace {
  kRaw,     ///< the encoder's: a metric, if any, is applied while packing
  kMapped,  ///< already mapped by to_metric_space() (callers that cache mapped specs)
};

/// How an index stores its reduced points, the bulk of its bytes (zx and zt: r x (d + dt)
/// numbers per model, against r^2 + r + d for the rest).
enum class SpecStorage {
  kF32,  ///< float32
  kF16,  ///< binary16: half the bytes; widened a block at a time while scoring (F16C where the
         ///< CPU has it), norms taken of the rounded values so each kernel stays consistent
};
const char* to_string(SpecStorage s);
/// "f32" | "f16"; throws InputError otherwise.
SpecStorage parse_storage(std::string_view name);

/// How a hub is searched: every model scored exactly, or the two-stage search
/// (SpecIndex::TwoStage); auto is exact below a size threshold and two-stage from it.
enum class SearchMode { kAuto, kExact, kTwoStage };
const char* to_string(SearchMode s);
/// "auto" | "exact" | "two-stage"; throws InputError otherwise.
SearchMode parse_search(std::string_view name);
/// True for the scorers the two-stage search serves (a per-model score it can estimate:
/// weighted, rkme, nearest); the others are always exact.
bool has_exact_stage(Scorer s);

/// A spec in a metric's space: zx and mean_x mapped (k columns), gamma the metric's, the
/// Gram matrix recomputed there. The encoder identity stays the raw one.
/// Throws EncoderMismatchError for a metric of another image encoder.
Spec to_metric_space(Spec spec, const Metric& metric);

/// Throws what SpecIndex's constructor would for this spec alone (shapes against its
/// encoders, or the metric's k columns when `space` is kMapped; non-finite values), so that a
/// caller packing many can leave a bad one out first.
void check_packable(const Spec& spec, const Metric* metric, SpecSpace space);

/// All specs of one hub, packed. Specs must share encoder identities (else
/// EncoderMismatchError naming the offending model). r may differ between models.
/// With a metric, everything is packed in the metric's mapped space (k dims): reduced
/// points and sample means mapped, every model's gamma replaced by the metric's and the
/// Gram matrices recomputed; queries (raw d-dim embeddings) are mapped as they come.
class SpecIndex {
 public:
  SpecIndex() = default;
  /// Throws EncoderMismatchError when `metric` was learnt for another image encoder.
  explicit SpecIndex(std::vector<Spec> specs, std::shared_ptr<const Metric> metric = nullptr,
                     SpecSpace space = SpecSpace::kRaw, SpecStorage storage = SpecStorage::kF32);

  /// The models of several indexes packed into one (a segment compaction): the parts in
  /// order, each part's models flagged in its `exclude` (null: none) left out. Arrays are
  /// copied as packed, never unpacked or re-rounded, so every kept model scores exactly as
  /// it did. The parts must share encoders, metric and storage, and a model id may be kept
  /// once only (InputError otherwise).
  struct Part {
    const SpecIndex* index = nullptr;
    const std::vector<bool>* exclude = nullptr;
  };
  static SpecIndex merge(const std::vector<Part>& parts);

  std::size_t size() const { return model_ids_.size(); }
  std::size_t points() const { return offsets_.empty() ? 0 : offsets_.back(); }
  SpecStorage storage() const { return storage_; }
  /// Bytes of the packed arrays (what scoring reads, and what the index holds beyond its ids).
  std::size_t memory_bytes() const;
  /// Of those, the bytes read from a memory-mapped snapshot (held by the page cache or the
  /// disk, not by the process): binary16 points opened with OpenOptions::map_points.
  std::size_t mapped_bytes() const;

  /// Writes the packed index to `path` as a snapshot (binary "GMISNAP1": a header with the
  /// encoders, the metric's checksum and each array's offset, size and CRC-32, then each array
  /// at a page-aligned offset, little-endian), atomically (write_file_atomically: a reader
  /// sees the old file or the whole new one). Throws IoError.
  void save(const std::string& path) const;
  struct OpenOptions {
    /// binary16 storage: the points stay in the file, memory-mapped read-only (the page
    /// cache holds them, or the disk: a shard may be larger than memory); every other array,
    /// and float32 points, are read in.
    bool map_points = true;
    /// Check every array's CRC-32 (reads the whole file once); false: the header's and the
    /// arrays read in only.
    bool verify = true;
  };
  /// Opens a snapshot written by save(). `metric` must be the one the index was packed with
  /// (null for none): EncoderMismatchError otherwise. A damaged, truncated or foreign file is a
  /// SpecFormatError naming the path and what is wrong; a missing one an IoError.
  static SpecIndex open(const std::string& path, std::shared_ptr<const Metric> metric, const OpenOptions& options);
  static SpecIndex open(const std::string& path, std::shared_ptr<const Metric> metric = nullptr) {
    return open(path, std::move(metric), OpenOptions{});
  }
  const EncoderIdentity& image_encoder() const { return image_encoder_; }
  const EncoderIdentity& text_encoder() const { return text_encoder_; }
  const std::vector<std::string>& model_ids() const { return model_ids_; }

  /// Throws EncoderMismatchError unless the query was embedded by this hub's encoders.
  void check_compatible(const EncoderIdentity& image, const EncoderIdentity& text) const;

  /// Scores every model for one query. x: d (L2-normalised image embedding); t: dt
  /// pseudo-prompt embedding (used by the weighted scorer only; may be empty otherwise).
  /// Returns one score per model, in model_ids() order.
  Eigen::VectorXd score_all(const Eigen::VectorXf& x, const Eigen::VectorXf& t,
                            const ScoreOptions& options) const;

  /// Batch form: rows of xs (B x d) and ts (B x dt). Returns B x M scores.
  RowMatrixD score_all_batch(const RowMatrix& xs, const RowMatrix& ts,
                             const ScoreOptions& options) const;

  /// score_all + top-k selection in rank order (the same models in the same order as
  /// top_k(score_all(...))), streamed: the scores of a block of models are folded into a
  /// bounded top-k as they are computed, so no query x models matrix is ever held.
  /// top_k <= 0 (every model) scores all first.
  std::vector<RankedModel> rank(const Eigen::VectorXf& x, const Eigen::VectorXf& t,
                                const ScoreOptions& options) const;
  /// `exclude` (size() flags, or null): models never ranked (a segment's tombstones).
  std::vector<std::vector<RankedModel>> rank_batch(const RowMatrix& xs, const RowMatrix& ts,
                                                   const ScoreOptions& options,
                                                   const std::vector<bool>* exclude = nullptr) const;

  /// Two-stage search. Stage 1 estimates models' scores from a compact summary of each spec:
  /// its reduced points grouped into `clusters` groups (beta-weighted kernel k-means on the
  /// spec's own Gram matrix), each group kept as its beta mass, its weighted mean point (and
  /// the spread of its points about it), its mean unit prompt, and the groups' block Gram.
  /// With residual_dims > 0 (the default) each point is also kept as its offset from its
  /// group's mean in `residual_dims` leading principal directions of such offsets, and its
  /// unit prompt in `prompt_dims` directions: the estimate is then the scorer's own formula
  /// over the points (z_j . x = c_g . x + offset_j . x, the model's exact Gram), exact when
  /// residual_dims reaches d and prompt_dims is 0. With residual_dims = 0 the groups stand for
  /// their points (exact when clusters >= r and dims = prompt_dims = 0). Group means are
  /// compared in `dims` leading principal directions (0: all). Bases are uncentred, learnt
  /// from a sample of at most 2048 models on first use and kept.
  struct TwoStage {
    std::size_t candidates = 256;
    int dims = 0;
    int prompt_dims = 32;
    int clusters = 4;  ///< 1 ... 255
    int lists = 0;     ///< inverted-file cells (0: none, every model estimated)
    int probe = 32;    ///< cells a query visits (lists > 0), 1 ... lists
    int residual_dims = 32;  ///< per-point residuals kept in this many directions (0: groups only)
    /// A coarse pass first (0: none): every model (or, with the inverted file, every model
    /// its probed cells list) estimated from its groups alone, in coarse_dims /
    /// coarse_prompt_dims directions, `coarse_clusters` groups each, and only its `coarse`
    /// best handed to the estimate above (with residuals; used when candidates < coarse <
    /// models).
    std::size_t coarse = 0;
    int coarse_dims = 128;
    int coarse_prompt_dims = 16;
    int coarse_clusters = 8;
    /// The coarse pass's own summary shape (groups alone, no inverted file).
    TwoStage coarse_shape() const {
      TwoStage c;
      c.candidates = coarse;
      c.dims = coarse_dims;
      c.prompt_dims = coarse_prompt_dims;
      c.clusters = coarse_clusters;
      c.lists = 0;
      c.residual_dims = 0;
      return c;
    }
  };
  std::vector<std::vector<RankedModel>> rank_batch_two_stage(const RowMatrix& xs, const RowMatrix& ts,
                                                             const ScoreOptions& options,
                                                             const TwoStage& search,
                                                             const std::vector<bool>* exclude = nullptr) const;
  /// Stage 1 alone: B x M estimated scores (lower is better for every scorer: the nearest
  /// scorer's estimate is negated; +inf for a model outside the probed cells), for measuring
  /// the first stage.
  RowMatrixD candidate_scores(const RowMatrix& xs, const RowMatrix& ts, const ScoreOptions& options,
                              const TwoStage& search) const;
  /// Builds the first stage's summary for `search` now (else the first query does); returns
  /// the bytes it takes. Safe to call from several threads.
  std::size_t prepare_two_stage(const TwoStage& search) const;
  /// True when `search` runs its coarse pass on this index (TwoStage::coarse).
  bool uses_coarse(const TwoStage& search) const;
  /// True when the summary for `search` is built (never waits for a build under way).
  bool two_stage_ready(const TwoStage& search) const;

  /// The metric the index scores with (null: the encoder's raw space).
  const std::shared_ptr<const Metric>& metric() const { return metric_; }
  /// Raw query embeddings (B x d) in the space the index scores in (B x k with a metric).
  RowMatrix map_queries(const RowMatrix& xs) const;

  /// Packed reduced points, for interrogators that learn from the hub itself; in the
  /// mapped space when the index has a metric (map queries with map_queries first).
  /// float32 storage only (InputError otherwise).
  const RowMatrix& all_zx() const;
  const RowMatrix& all_zt() const;
  const Eigen::VectorXf& all_beta() const { return beta_; }
  /// Reduced points of model m are rows [offsets()[m], offsets()[m+1]).
  const std::vector<std::size_t>& offsets() const { return offsets_; }

 private:
  std::vector<std::string> model_ids_;
  EncoderIdentity image_encoder_, text_encoder_;
  std::shared_ptr<const Metric> metric_;
  std::vector<std::size_t> offsets_;   // M + 1
  SpecStorage storage_ = SpecStorage::kF32;
  Eigen::Index dx_ = 0, dt_ = 0;       // columns of zx and zt (in the space scored)
  RowMatrix zx_;                       // P x d, all reduced points (float32 storage)
  RowMatrix zt_;                       // P x dt
  // binary16 points: owned, or a read-only view of a memory-mapped snapshot kept alive by
  // `keep` (copies of a view share the mapping; copies of owned points copy them).
  class HalfArray {
   public:
    HalfArray() = default;
    HalfArray(const HalfArray& o) { *this = o; }
    HalfArray(HalfArray&&) noexcept = default;
    HalfArray& operator=(const HalfArray& o) {
      if (this == &o) return *this;
      owned_ = o.owned_;
      keep_ = o.keep_;
      size_ = o.size_;
      data_ = keep_ ? o.data_ : owned_.data();
      return *this;
    }
    HalfArray& operator=(HalfArray&&) noexcept = default;
    void resize(std::size_t n) {
      owned_.assign(n, 0);
      keep_.reset();
      data_ = owned_.data();
      size_ = n;
    }
    void view(const std::uint16_t* data, std::size_t n, std::shared_ptr<const void> keep) {
      owned_.clear();
      owned_.shrink_to_fit();
      keep_ = std::move(keep);
      data_ = data;
      size_ = n;
    }
    const std::uint16_t* data() const { return data_; }
    std::uint16_t* mutable_data() { return owned_.data(); }  // owned points only
    std::size_t size() const { return size_; }
    bool mapped() const { return keep_ != nullptr; }

   private:
    std::vector<std::uint16_t> owned_;
    std::shared_ptr<const void> keep_;
    const std::uint16_t* data_ = nullptr;
    std::size_t size_ = 0;
  };
  HalfArray zx16_;                     // P x d, row-major (binary16 storage)
  HalfArray zt16_;                     // P x dt
  Eigen::VectorXf zx_sqnorm_;          // P
  Eigen::VectorXf zt_inv_norm_;        // P, 1 / ||zt_j|| (0 for a zero row)
  Eigen::VectorXf beta_;               // P
  Eigen::VectorXf log_beta_;           // P, log beta_j (-inf where beta_j == 0)
  std::vector<float> grams_;           // sum_m r_m^2, each model's K_zz^x row-major
  std::vector<std::size_t> gram_offsets_;  // M
  Eigen::VectorXd beta_k_beta_;        // M, beta^T K beta (unweighted self term)
  Eigen::VectorXf gamma_;              // M, each model's kernel width
  RowMatrix mean_unit_;                // M x d, L2-normalised sample means
  Eigen::VectorXd downloads_;          // M

  // The first stage's summaries, per (dims, prompt_dims, clusters, lists, residual_dims), built on first use
  // and shared by copies of the index.
  struct Summary;  // two_stage.cpp
  struct SummaryCache {
    std::mutex mutex;
    std::map<std::array<int, 5>, std::shared_ptr<const Summary>> by_shape;
  };
  std::shared_ptr<SummaryCache> summaries_ = std::make_shared<SummaryCache>();
  std::shared_ptr<const Summary> summary(const TwoStage& search) const;
  /// The cache key of `search`'s summary (its dimensions clamped to the index's).
  std::array<int, 5> summary_shape(const TwoStage& search) const;

  struct QueryTerms;  // one query's norms, as the per-model pass needs them
  void check_query(const float* x, Eigen::Index x_size, const float* t, Eigen::Index t_size,
                   bool weighted, QueryTerms& terms) const;
  /// Scores models [m_begin, m_end) for `count` queries. s / tdot: row q holds zx_j . x_q /
  /// zt_j . t_q for the points of those models (leading dimension `ld`); out: row q, stride
  /// out_stride, model m at out[q * out_stride + m - out_first].
  void finish_models(std::size_t m_begin, std::size_t m_end, int count, const float* s,
                     const float* tdot, std::size_t ld, const QueryTerms* terms,
                     const ScoreOptions& options, double* out, std::size_t out_stride,
                     std::size_t out_first) const;
  /// Gets the scores of models [m_begin, m_end) for queries [q_begin, q_begin + count):
  /// query q's score of model m at scores[(q - q_begin) * (m_end - m_begin) + m - m_begin].
  using BlockSink = std::function<void(std::size_t m_begin, std::size_t m_end, Eigen::Index q_begin,
                                       Eigen::Index count, const double* scores)>;
  /// Scores models [m_begin, m_end) block by block, into `out` (row q, stride out_stride,
  /// model m at column m), or, with a sink, into a block buffer handed to the sink.
  /// out (count x len, row-major) = rows [q0, q0 + count) of qs times the points
  /// [pa, pa + len) of zx (or zt: `prompts`), whatever the storage.
  void products(bool prompts, Eigen::Index pa, Eigen::Index len, const RowMatrix& qs, Eigen::Index q0,
                Eigen::Index count, float* out, std::vector<float>& scratch) const;
  void score_range(std::size_t m_begin, std::size_t m_end, const RowMatrix& xs,
                   const RowMatrix& ts, const QueryTerms* terms, const ScoreOptions& options,
                   double* out, std::size_t out_stride, const BlockSink* sink = nullptr) const;
  /// What score_all_batch checks and prepares before the per-model pass: the queries in the
  /// index's space, their terms and the multiply-adds of the per-model pass.
  struct Prepared;
  void prepare(const RowMatrix& xs, const RowMatrix& ts, const ScoreOptions& options,
               Prepared& p) const;
  /// Stage 1 on models [m_begin, m_end) for queries already in the summary's bases (qx: B x
  /// dims, qt: B x prompt_dims, unit, or no rows): sink(q, ma, mb, estimates) per block.
  using EstimateSink = std::function<void(Eigen::Index q, std::size_t m_begin, std::size_t m_end, const float* estimates)>;
  void estimate_range(const Summary& summary, const RowMatrix& qx, const RowMatrix& qt, const RowMatrix& qr,
                      const QueryTerms* terms, const ScoreOptions& options, std::size_t m_begin,
                      std::size_t m_end, const EstimateSink& sink) const;
  /// Stage 1 on the listed models (ascending) for one query in the summary's bases (qt null
  /// without a pseudo-prompt): their estimates into out, in that order.
  void estimate_listed(const Summary& summary, const float* qx, const float* qt, const float* qr,
                       const QueryTerms& terms, const ScoreOptions& options, const std::uint32_t* models,
                       std::size_t count, float* out) const;
  /// Stage 1 over every model (queries in the summary's bases): per query its `keep` best
  /// live models by the estimate, ascending.
  std::vector<std::vector<std::size_t>> shortlist_all(const Summary& summary, const RowMatrix& qx,
                                                      const RowMatrix& qt, const RowMatrix& qr,
                                                      const QueryTerms* terms, const ScoreOptions& options,
                                                      std::size_t keep, const std::vector<bool>* exclude) const;
  /// The models listed in the `probe` inverted-file cells nearest to query q (in the summary's
  /// basis), and in further cells while fewer than `least` are listed; ascending, each once.
  std::vector<std::uint32_t> probed_models(const Summary& summary, const RowMatrix& qx, Eigen::Index q,
                                           int probe, std::size_t least) const;
  /// Rows [p, p + n) of zx (or zt: `prompts`) as float32, whatever the storage, into out (n x cols).
  void load_points(bool prompts, Eigen::Index p, Eigen::Index n, float* out) const;
};

/// Top-k of `scores` (ascending or descending), ties broken by model id; models flagged in
/// `exclude` (when given) left out.
std::vector<RankedModel> top_k(const Eigen::VectorXd& scores,
                               const std::vector<std::string>& ids, bool ascending, int k,
                               const std::vector<bool>* exclude = nullptr);
/// True when `a` ranks ahead of `b` in top_k's order (NaN last, then by score, then by id).
bool ranks_ahead(const RankedModel& a, const RankedModel& b, bool ascending);

}  // namespace gmi
