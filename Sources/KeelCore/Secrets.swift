// Comparing secrets (the cluster token, the server's password) in time that does not depend on
// where they first differ, so that timing the answers does not reveal a secret byte by byte.

/// Whether `presented` equals `secret`, comparing every byte of the secret whatever the contents:
/// the work done depends on the secret's length only, not on the presented bytes, their length
/// or where they differ (a loop over the longer of the two would let a client find the secret's
/// length by timing presented strings of growing length). Each presented byte is read at most
/// once, and only at positions the secret has.
public func constantTimeEquals<Presented: RandomAccessCollection<UInt8>>(_ presented: Presented, secret: [UInt8]) -> Bool {
    var difference: UInt8 = presented.count == secret.count ? 0 : 1
    var position = presented.startIndex
    for index in 0..<secret.count {
        // Past the presented bytes, the secret is compared with its own complement: a
        // difference, as the lengths already are, taking the same time as any other byte.
        var x = ~secret[index]
        if position != presented.endIndex {
            x = presented[position]
            presented.formIndex(after: &position)
        }
        difference |= x ^ secret[index]
    }
    return difference == 0
}
