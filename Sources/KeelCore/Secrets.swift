// Comparing secrets (the cluster token, the server's password) in time that does not depend on
// where they first differ, so that timing the answers does not reveal a secret byte by byte.

/// Whether `a` and `b` are equal, comparing every byte whatever the contents (only the lengths
/// shape the time taken).
public func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    var difference: UInt8 = a.count == b.count ? 0 : 1
    for index in 0..<max(a.count, b.count) {
        let x = index < a.count ? a[index] : 0
        let y = index < b.count ? b[index] : 0
        difference |= x ^ y
    }
    return difference == 0
}
