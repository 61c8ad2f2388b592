//
// bench/idle.cpp: W6 and W6b, a limiter nobody calls.
//
// Per repetition a window without the limiter, then a window with it (3 s
// each; --quick 0.3 s), at 1/s (W6) or 1000/s (W6b). CPU time (schedstat)
// and context switches summed over /proc/self/task/*. For our bucket the main
// thread runs the io_context through each window with run_for(), whose return
// value is the number of handlers run: the limiter's share must be zero.
//
// Metrics: cpu_ms ctx_switches base_cpu_ms base_ctx_switches [handlers base_handlers]
//
#include "bench.hpp"
#include "textbook.hpp"

#include <ratelimit/token_bucket.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <optional>
#include <thread>

namespace bench {

void run_idle() {
  namespace asio = boost::asio;
  const std::uint64_t per_second = opt.workload == "W6b" ? 1000 : 1;
  const auto win = std::chrono::milliseconds(opt.quick ? 300 : 3000);
  const bool ours = opt.impl == "asio_ratelimit";
  asio::io_context ioc(1);
  auto guard = asio::make_work_guard(ioc);
  // One window: the io_context run for `win` (ours) or a plain sleep (textbook).
  auto window = [&](std::size_t& handlers) {
    const task_snapshot a = task_snapshot::take();
    if (ours)
      handlers = ioc.run_for(win);
    else
      std::this_thread::sleep_for(win);
    return task_delta(a, task_snapshot::take());
  };
  for (int rep = 0, reps = pick(3, 1); rep < reps; ++rep) {
    std::size_t base_handlers = 0, handlers = 0;
    const task_totals base = window(base_handlers);
    task_totals with;
    if (ours) {
      ratelimit::token_bucket bucket(ioc, 1, ratelimit::per_second(per_second));
      with = window(handlers);
    } else {
      textbook_bucket bucket(static_cast<double>(per_second), 1);
      with = window(handlers);
    }
    std::string m = format("cpu_ms=%.3f ctx_switches=%ld base_cpu_ms=%.3f base_ctx_switches=%ld",
                           with.cpu_ms, with.ctx_switches, base.cpu_ms, base.ctx_switches);
    if (ours) m += format(" handlers=%zu base_handlers=%zu", handlers, base_handlers);
    emit(rep, m);
  }
}

}  // namespace bench
