//
// test/support/fuzz_replay.hpp: the replay main() of the fuzz targets (built
// with RATELIMIT_FUZZ_REPLAY, run by ctest on the committed corpora).
//
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace ratelimit::test {

/// Replays every file given, or every file in every directory given (but
/// *.md), in name order, through `one_input` (a target's
/// LLVMFuzzerTestOneInput, which aborts on a finding). `name` prefixes the
/// messages; `verdict` ends the last line. 1 when there was no input.
inline int fuzz_replay_main(const char* name, const char* verdict, int argc, char** argv,
                            int (*one_input)(const std::uint8_t*, std::size_t)) {
  namespace fs = std::filesystem;
  std::vector<fs::path> files;
  for (int i = 1; i < argc; ++i) {
    const fs::path p(argv[i]);
    if (!fs::exists(p)) {
      std::fprintf(stderr, "%s: %s does not exist, skipped\n", name, argv[i]);
    } else if (fs::is_directory(p)) {
      for (const auto& e : fs::directory_iterator(p))
        if (e.is_regular_file() && e.path().extension() != ".md") files.push_back(e.path());
    } else {
      files.push_back(p);
    }
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "%s: no input files\n", name);
    return 1;
  }
  for (const fs::path& f : files) {
    std::ifstream is(f, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(is)), std::istreambuf_iterator<char>());
    one_input(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
  }
  std::printf("%s: %zu inputs replayed, %s\n", name, files.size(), verdict);
  return 0;
}

}  // namespace ratelimit::test
