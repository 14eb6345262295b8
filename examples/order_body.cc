// order_body.cc: a small strict parser for POST /orders bodies (see order_body.h). No JSON
// library: the accepted language is one flat object of strings and integers.

#include "order_body.h"

#include <cctype>
#include <charconv>
#include <cstdio>
#include <map>
#include <optional>

namespace example {
namespace {

// A field's raw value: a string, or (JSON only) the text of an integer.
struct Value {
  bool is_string = true;
  std::string text;
};
using Fields = std::map<std::string, Value, std::less<>>;

constexpr std::size_t kMaxField = 64;

class JsonReader {
 public:
  explicit JsonReader(std::string_view s) : s_(s) {}

  // Reads the whole body as one flat object; nullopt with error() set otherwise.
  std::optional<Fields> object() {
    Fields fields;
    skip_space();
    if (!eat('{')) return fail("the body must be a JSON object");
    skip_space();
    if (!eat('}')) {
      for (;;) {
        skip_space();
        std::string key;
        if (!string(key)) return fail(error_.empty() ? "expected a field name in quotes" : error_);
        skip_space();
        if (!eat(':')) return fail("expected ':' after \"" + key + "\"");
        skip_space();
        Value value;
        if (peek() == '"') {
          if (!string(value.text)) return std::nullopt;
        } else if (peek() == '-' || std::isdigit(static_cast<unsigned char>(peek()))) {
          value.is_string = false;
          if (!integer(value.text)) return fail("\"" + key + "\" must be an integer");
        } else {
          return fail("\"" + key + "\" must be a string or an integer");
        }
        if (!fields.emplace(key, value).second) return fail("\"" + key + "\" is repeated");
        skip_space();
        if (eat('}')) break;
        if (!eat(',')) return fail("expected ',' or '}' after \"" + key + "\"");
      }
    }
    skip_space();
    if (pos_ != s_.size()) return fail("unexpected bytes after the JSON object");
    return fields;
  }
  const std::string& error() const { return error_; }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  bool eat(char c) {
    if (peek() != c || pos_ >= s_.size()) return false;
    ++pos_;
    return true;
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' ||
                                s_[pos_] == '\r')) {
      ++pos_;
    }
  }
  std::nullopt_t fail(std::string why) {
    error_ = std::move(why);
    return std::nullopt;
  }
  bool string(std::string& out) {
    if (!eat('"')) return false;
    while (pos_ < s_.size()) {
      const char c = s_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return bad("a control character in a string");
      if (out.size() >= kMaxField) return bad("a string longer than 64 characters");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) break;
      const char e = s_[pos_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = 0;
          if (pos_ + 4 > s_.size()) return bad("a truncated \\u escape");
          auto [end, ec] = std::from_chars(s_.data() + pos_, s_.data() + pos_ + 4, code, 16);
          if (ec != std::errc() || end != s_.data() + pos_ + 4) return bad("a bad \\u escape");
          if (code == 0 || code > 0x7f) return bad("a \\u escape outside ASCII");
          pos_ += 4;
          out += static_cast<char>(code);
          break;
        }
        default: return bad("an unknown escape in a string");
      }
    }
    return bad("an unterminated string");
  }
  bool bad(const char* why) {
    error_ = why;
    return false;
  }
  // JSON's integer grammar: -?(0|[1-9][0-9]*), no fraction or exponent.
  bool integer(std::string& out) {
    const std::size_t start = pos_;
    eat('-');
    if (eat('0')) {
      if (std::isdigit(static_cast<unsigned char>(peek()))) return false;
    } else {
      if (!std::isdigit(static_cast<unsigned char>(peek()))) return false;
      while (std::isdigit(static_cast<unsigned char>(peek()))) ++pos_;
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') return false;
    out = std::string(s_.substr(start, pos_ - start));
    return true;
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  std::string error_;
};

int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      const int hi = hex(s[i + 1]), lo = hex(s[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::optional<Fields> parse_form(std::string_view body, std::string& error) {
  Fields fields;
  if (body.empty()) {
    error = "the form is empty";
    return std::nullopt;
  }
  while (!body.empty()) {
    const std::size_t amp = body.find('&');
    const std::string_view pair = body.substr(0, amp);
    body = amp == std::string_view::npos ? std::string_view() : body.substr(amp + 1);
    const std::size_t eq = pair.find('=');
    if (eq == std::string_view::npos) {
      error = "a form field without '=': '" + std::string(pair.substr(0, kMaxField)) + "'";
      return std::nullopt;
    }
    const auto key = percent_decode(pair.substr(0, eq));
    const auto value = percent_decode(pair.substr(eq + 1));
    if (!key || !value) {
      error = "a bad %-escape in the form";
      return std::nullopt;
    }
    if (!fields.emplace(*key, Value{true, *value}).second) {
      error = "\"" + *key + "\" is repeated";
      return std::nullopt;
    }
  }
  return fields;
}

bool allowed(std::string_view s, std::string_view extra) {
  if (s.empty() || s.size() > kMaxField) return false;
  for (char c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && extra.find(c) == std::string_view::npos) {
      return false;
    }
  }
  return true;
}

ParsedOrder refuse(std::string why, unsigned status = 400) {
  ParsedOrder p;
  p.status = status;
  p.error = std::move(why);
  return p;
}

}  // namespace

ParsedOrder parse_order(std::string_view content_type, std::string_view body) {
  const std::string_view media = content_type.substr(0, content_type.find(';'));
  std::optional<Fields> fields;
  std::string error;
  if (media == "application/json") {
    JsonReader reader(body);
    fields = reader.object();
    error = reader.error();
  } else if (media == "application/x-www-form-urlencoded") {
    fields = parse_form(body, error);
  } else {
    return refuse("Content-Type must be application/json or application/x-www-form-urlencoded",
                  415);
  }
  if (!fields) return refuse(error);
  for (const auto& [key, value] : *fields) {
    if (key != "customer" && key != "amount" && key != "ref") {
      return refuse("unknown field \"" + key.substr(0, kMaxField) +
                    "\"; the fields are customer, amount and ref");
    }
  }
  ParsedOrder p;
  const auto customer = fields->find("customer");
  if (customer == fields->end()) return refuse("\"customer\" is required");
  if (!customer->second.is_string || !allowed(customer->second.text, " _.@-")) {
    return refuse("\"customer\" must be 1-64 characters of letters, digits, space, _ . @ -");
  }
  p.order.customer = customer->second.text;
  const auto amount = fields->find("amount");
  if (amount == fields->end()) return refuse("\"amount\" is required");
  const std::string& digits = amount->second.text;
  long value = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if ((media == "application/json" && amount->second.is_string) || ec != std::errc() ||
      end != digits.data() + digits.size() || value < 1 || value > 1000000) {
    return refuse("\"amount\" must be an integer from 1 to 1000000");
  }
  p.order.amount = value;
  if (const auto ref = fields->find("ref"); ref != fields->end()) {
    if (!ref->second.is_string || !allowed(ref->second.text, "_.-")) {
      return refuse("\"ref\" must be 1-64 characters of letters, digits, _ . -");
    }
    p.order.ref = ref->second.text;
  }
  p.ok = true;
  return p;
}

std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace example
