// `keel serve --join HOST:PORT`: asks a running member (its Redis port) to add this node as a
// learner, and learns where every member listens for peers. A small blocking RESP client: it runs
// once, before the server starts.

import Foundation
import Keel
import KeelCore

struct JoinError: Error, CustomStringConvertible {
    var description: String
}

/// One connection to a Redis-protocol server, one request at a time.
final class RESPClient {
    private let handle: FileHandle
    private var buffer = Data()

    init(host: String, port: Int) throws {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let first = result else {
            throw JoinError(description: "cannot resolve \(host)")
        }
        defer { freeaddrinfo(result) }
        let fd = socket(first.pointee.ai_family, first.pointee.ai_socktype, first.pointee.ai_protocol)
        guard fd >= 0, connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0 else {
            if fd >= 0 { close(fd) }
            throw JoinError(description: "cannot connect to \(host):\(port): \(String(cString: strerror(errno)))")
        }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
    }

    /// Sends a command; returns the reply as text lines (a bulk string or each element of an
    /// array of bulk strings), or throws the error reply.
    func call(_ words: [String]) throws -> [String] {
        var request = "*\(words.count)\r\n"
        for word in words { request += "$\(word.utf8.count)\r\n\(word)\r\n" }
        handle.write(Data(request.utf8))
        let line = try readLine()
        switch line.first {
        case "+": return [String(line.dropFirst())]
        case "-": throw JoinError(description: String(line.dropFirst()))
        case ":": return [String(line.dropFirst())]
        case "$": return [try readBulk(Int(line.dropFirst()) ?? -1)]
        case "*":
            let count = Int(line.dropFirst()) ?? 0
            return try (0..<max(0, count)).map { _ in
                let header = try readLine()
                return try readBulk(Int(header.dropFirst()) ?? -1)
            }
        default: throw JoinError(description: "unexpected reply \(line)")
        }
    }

    private func fill() throws {
        let chunk = handle.availableData
        guard !chunk.isEmpty else { throw JoinError(description: "the member closed the connection") }
        buffer.append(chunk)
    }

    private func readLine() throws -> String {
        while true {
            if let end = buffer.firstRange(of: Data("\r\n".utf8)) {
                let line = String(decoding: buffer[buffer.startIndex..<end.lowerBound], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex..<end.upperBound)
                return line
            }
            try fill()
        }
    }

    private func readBulk(_ length: Int) throws -> String {
        guard length >= 0 else { return "" }
        while buffer.count < length + 2 { try fill() }
        let text = String(decoding: buffer.prefix(length), as: UTF8.self)
        buffer.removeFirst(length + 2)
        return text
    }
}

/// Adds this node as a learner through the member at `target` and returns every member's peer
/// address (this node's included). A node that is already a member (a restart) just learns them.
func joinCluster(target: String, node: NodeID, peerAddress: PeerAddress) throws -> [NodeID: PeerAddress] {
    guard let colon = target.lastIndex(of: ":"), let port = Int(target[target.index(after: colon)...]) else {
        throw JoinError(description: "--join takes HOST:PORT (a member's client port)")
    }
    let client = try RESPClient(host: String(target[..<colon]), port: port)
    do {
        _ = try client.call(["KEEL.MEMBER", "ADD", String(node.rawValue), peerAddress.description, "LEARNER"])
    } catch let error as JoinError where error.description.contains("already a member") {
        // Joined before: nothing to add.
    }
    var members: [NodeID: PeerAddress] = [node: peerAddress]
    for line in try client.call(["KEEL.MEMBER", "LIST"]) {
        var fields: [String: String] = [:]
        for pair in line.split(separator: " ") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
        }
        guard let id = fields["id"].flatMap(UInt64.init), let address = fields["address"], let colon = address.lastIndex(of: ":"),
              let peerPort = Int(address[address.index(after: colon)...]), NodeID(id) != node else { continue }
        members[NodeID(id)] = PeerAddress(host: String(address[..<colon]), port: peerPort)
    }
    return members
}
