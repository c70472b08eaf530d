// Redis's glob-style patterns (KEYS, SCAN MATCH): * ? [abc] [^a] [a-z] and \ to escape.

/// Whether `string` matches the glob `pattern` (byte-wise, as Redis's stringmatchlen).
public func globMatch(_ pattern: ArraySlice<UInt8>, _ string: ArraySlice<UInt8>, depth: Int = 0) -> Bool {
    var p = pattern.startIndex
    var s = string.startIndex
    // Recursion only at '*', bounded (Redis bounds it too): a pathological pattern cannot blow the stack.
    guard depth < 64 else { return false }
    while p < pattern.endIndex {
        switch pattern[p] {
        case UInt8(ascii: "*"):
            while p + 1 < pattern.endIndex, pattern[p + 1] == UInt8(ascii: "*") { p += 1 }
            if p + 1 == pattern.endIndex { return true }
            var start = s
            while start <= string.endIndex {
                if globMatch(pattern[(p + 1)...], string[start...], depth: depth + 1) { return true }
                start += 1
            }
            return false
        case UInt8(ascii: "?"):
            if s == string.endIndex { return false }
            s += 1
        case UInt8(ascii: "["):
            if s == string.endIndex { return false }
            p += 1
            let negate = p < pattern.endIndex && pattern[p] == UInt8(ascii: "^")
            if negate { p += 1 }
            var matched = false
            while p < pattern.endIndex, pattern[p] != UInt8(ascii: "]") {
                if pattern[p] == UInt8(ascii: "\\"), p + 1 < pattern.endIndex {
                    p += 1
                    if pattern[p] == string[s] { matched = true }
                } else if p + 2 < pattern.endIndex, pattern[p + 1] == UInt8(ascii: "-"), pattern[p + 2] != UInt8(ascii: "]") {
                    let (low, high) = (min(pattern[p], pattern[p + 2]), max(pattern[p], pattern[p + 2]))
                    if string[s] >= low && string[s] <= high { matched = true }
                    p += 2
                } else if pattern[p] == string[s] {
                    matched = true
                }
                p += 1
            }
            if p == pattern.endIndex { p -= 1 } // an unterminated class ends the pattern (as Redis)
            if matched == negate { return false }
            s += 1
        case UInt8(ascii: "\\") where p + 1 < pattern.endIndex:
            p += 1
            if s == string.endIndex || pattern[p] != string[s] { return false }
            s += 1
        default:
            if s == string.endIndex || pattern[p] != string[s] { return false }
            s += 1
        }
        p += 1
    }
    return s == string.endIndex
}
