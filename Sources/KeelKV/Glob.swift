// Redis's glob-style patterns (KEYS, SCAN MATCH): * ? [abc] [^a] [a-z] and \ to escape.

/// Whether `string` matches the glob `pattern` (byte-wise, as Redis's stringmatchlen). Iterative,
/// backtracking only to the last '*': O(pattern × string) at worst, whatever the pattern.
public func globMatch(_ pattern: ArraySlice<UInt8>, _ string: ArraySlice<UInt8>) -> Bool {
    let p = Array(pattern)
    let s = Array(string)
    var pi = 0
    var si = 0
    var star: (pattern: Int, string: Int)?
    while si < s.count {
        if pi < p.count, p[pi] == UInt8(ascii: "*") {
            while pi < p.count, p[pi] == UInt8(ascii: "*") { pi += 1 }
            if pi == p.count { return true }
            star = (pi, si)
            continue
        }
        if pi < p.count, let next = matchOne(p, pi, s[si]) {
            pi = next
            si += 1
            continue
        }
        guard let last = star else { return false }
        // Let the last '*' take one more byte and try again from after it.
        star = (last.pattern, last.string + 1)
        pi = last.pattern
        si = last.string + 1
    }
    while pi < p.count, p[pi] == UInt8(ascii: "*") { pi += 1 }
    return pi == p.count
}

/// Matches one byte against the pattern element at `index` (not '*'); the index after the
/// element when it matches.
private func matchOne(_ p: [UInt8], _ index: Int, _ byte: UInt8) -> Int? {
    switch p[index] {
    case UInt8(ascii: "?"):
        return index + 1
    case UInt8(ascii: "\\") where index + 1 < p.count:
        return p[index + 1] == byte ? index + 2 : nil
    case UInt8(ascii: "["):
        var i = index + 1
        let negate = i < p.count && p[i] == UInt8(ascii: "^")
        if negate { i += 1 }
        var matched = false
        while i < p.count, p[i] != UInt8(ascii: "]") {
            if p[i] == UInt8(ascii: "\\"), i + 1 < p.count {
                i += 1
                if p[i] == byte { matched = true }
            } else if i + 2 < p.count, p[i + 1] == UInt8(ascii: "-"), p[i + 2] != UInt8(ascii: "]") {
                let (low, high) = (min(p[i], p[i + 2]), max(p[i], p[i + 2]))
                if byte >= low && byte <= high { matched = true }
                i += 2
            } else if p[i] == byte {
                matched = true
            }
            i += 1
        }
        // An unterminated class ends the pattern (as Redis).
        guard matched != negate else { return nil }
        return min(i + 1, p.count)
    default:
        return p[index] == byte ? index + 1 : nil
    }
}
