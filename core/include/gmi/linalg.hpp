#pragma once
/// Matrix types shared across the core. Embeddings are stored one per row, row-major,
/// so that one sample (or one reduced point) is contiguous in memory and on disk.
#include <Eigen/Dense>

namespace gmi {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;
using VectorD = Eigen::VectorXd;

}  // namespace gmi
