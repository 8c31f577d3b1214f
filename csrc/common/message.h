// Error-message text for the adapters' checks, built by plain string appends: numbers, shapes,
// devices and dtypes become text here, and c10::str receives one std::string, which it passes
// through without an ostringstream. Inserting an integer into c10::str's ostringstream killed
// the process (SIGSEGV) in a CUDA build once CUDA was initialized (H100, torch 2.11+cu130,
// GCC 13.3), while the messages made only of strings raised normally; appends sidestep the
// iostream number formatting on every device.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fastdecode::message {

inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }

template <typename T>
  requires std::is_integral_v<T>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);  // what an ostream prints by default
  s += buf;
}

// [2, 3, 4], as torch prints a shape.
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

inline void append(std::string& s, const at::Device& v) { s += v.str(); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }

// The concatenated text of `parts` (strings, integers, doubles, shapes, devices, dtypes).
template <typename... Parts>
std::string text(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace fastdecode::message
