// Comparing secrets (the cluster token, the server's password) in time that does not depend on
// where they first differ, so that timing the answers does not reveal a secret byte by byte.

/// Whether `presented` equals `secret`, comparing every byte of the secret whatever the contents:
/// the work done depends on the secret's length (and on whether anything was presented at all),
/// not on the presented bytes, their length or where they differ. A loop over the longer of the
/// two would let a client find the secret's length by timing presented strings of growing
/// length; here each step reads one presented byte (past the end, one from the start again,
/// masked off) and does the same arithmetic.
public func constantTimeEquals<Presented: RandomAccessCollection<UInt8>>(_ presented: Presented, secret: [UInt8]) -> Bool {
    let count = presented.count
    guard count > 0 else { return secret.isEmpty }
    var difference: UInt8 = count == secret.count ? 0 : 1
    for index in 0..<secret.count {
        let byte = presented[presented.index(presented.startIndex, offsetBy: index % count)]
        // All ones while the presented bytes last, zero past them (the sign of index - count).
        let inside = UInt8(truncatingIfNeeded: (index &- count) >> (Int.bitWidth - 1))
        // Past the presented bytes the secret meets its own complement: a difference, as the
        // lengths already are.
        let x = (byte & inside) | (~secret[index] & ~inside)
        difference |= x ^ secret[index]
    }
    return difference == 0
}
