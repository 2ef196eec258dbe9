// JS <-> C++ conversion helpers shared by the addon's modules. TypeScript has already validated and
// filled every field; these only convert, and name the field when a type is wrong.
#pragma once
#include <napi.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moepilot/error.h"

namespace moepilot::addon {

inline Napi::Value field(const Napi::Object& o, const char* name) {
  Napi::Value v = o.Get(name);
  MP_CHECK_ARG(!v.IsUndefined(), std::string("missing field '") + name + "'");
  return v;
}
inline double get_number(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  MP_CHECK_ARG(v.IsNumber(), std::string("field '") + name + "' must be a number");
  return v.As<Napi::Number>().DoubleValue();
}
inline int get_int(const Napi::Object& o, const char* name) { return (int)get_number(o, name); }
inline bool get_bool(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  MP_CHECK_ARG(v.IsBoolean(), std::string("field '") + name + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}
inline std::string get_string(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  MP_CHECK_ARG(v.IsString(), std::string("field '") + name + "' must be a string");
  return v.As<Napi::String>().Utf8Value();
}
inline bool is_null(const Napi::Object& o, const char* name) {
  Napi::Value v = o.Get(name);
  return v.IsUndefined() || v.IsNull();
}

// Copies a typed array field into a vector (fields are small: ids, masks, per-token scalars).
template <class T, napi_typedarray_type Type>
std::vector<T> get_typed(const Napi::Object& o, const char* name) {
  Napi::Value v = field(o, name);
  MP_CHECK_ARG(v.IsTypedArray(), std::string("field '") + name + "' must be a typed array");
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  MP_CHECK_ARG(ta.TypedArrayType() == Type, std::string("field '") + name + "' has the wrong element type");
  const T* data = reinterpret_cast<const T*>(static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
  return std::vector<T>(data, data + ta.ElementLength());
}
inline std::vector<float> get_f32(const Napi::Object& o, const char* name) {
  return get_typed<float, napi_float32_array>(o, name);
}
inline std::vector<int32_t> get_i32(const Napi::Object& o, const char* name) {
  return get_typed<int32_t, napi_int32_array>(o, name);
}

inline Napi::Float32Array to_f32(Napi::Env env, const std::vector<float>& v) {
  Napi::Float32Array a = Napi::Float32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(float));
  return a;
}
inline Napi::Int32Array to_i32(Napi::Env env, const std::vector<int32_t>& v) {
  Napi::Int32Array a = Napi::Int32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(int32_t));
  return a;
}

}  // namespace moepilot::addon
