// A small blocking Redis client for the torture run's client threads: one TCP connection, one
// request at a time, every wait bounded by a deadline. Blocking on purpose: each client is a
// thread that invokes an operation, waits for its answer (or its deadline), and records both
// times, the way a user's program would.

import Foundation
import Glibc

/// A RESP2 reply.
public indirect enum RESPValue: Sendable, Equatable {
    case simple(String)
    case error(String)
    case integer(Int64)
    case bulk([UInt8]?)
    case array([RESPValue]?)

    /// The text of a simple or bulk string.
    var text: String? {
        switch self {
        case .simple(let text): text
        case .bulk(let bytes?): String(decoding: bytes, as: UTF8.self)
        case .error, .integer, .bulk(nil), .array: nil
        }
    }
}

/// Why a request has no answer.
public enum RESPClientError: Error, Sendable, CustomStringConvertible {
    /// The connection could not be made (nothing was sent).
    case connectFailed(String)
    /// The deadline passed after the request was sent.
    case timedOut
    /// The connection closed or failed after the request was sent.
    case closed(String)
    /// The server sent bytes that are not RESP.
    case malformed(String)

    public var description: String {
        switch self {
        case .connectFailed(let reason): "connect failed: \(reason)"
        case .timedOut: "timed out"
        case .closed(let reason): "connection closed: \(reason)"
        case .malformed(let reason): "malformed reply: \(reason)"
        }
    }
}

/// One blocking connection.
final class RESPClient {
    private var socket: Int32 = -1
    private var buffer: [UInt8] = []
    private var position = 0
    /// The longest reply accepted (a bound on what a broken server can make us hold).
    static let replyBytesMax = 64 << 20

    let port: Int

    /// Connects to 127.0.0.1:`port` within `timeout` seconds.
    init(port: Int, timeout: Double) throws(RESPClientError) {
        self.port = port
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .connectFailed("socket: \(String(cString: strerror(errno)))") }
        socket = fd
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if result != 0 {
            guard errno == EINPROGRESS else {
                let reason = String(cString: strerror(errno))
                close()
                throw .connectFailed(reason)
            }
            guard wait(events: Int16(POLLOUT), until: Self.deadline(after: timeout)) else {
                close()
                throw .connectFailed("timed out")
            }
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length)
            if error != 0 {
                close()
                throw .connectFailed(String(cString: strerror(error)))
            }
        }
    }

    deinit { close() }

    func close() {
        if socket >= 0 { Glibc.close(socket) }
        socket = -1
    }

    var isOpen: Bool { socket >= 0 }

    static func deadline(after seconds: Double) -> UInt64 {
        DispatchTime.now().uptimeNanoseconds + UInt64(max(0, seconds) * 1e9)
    }

    /// Sends one command and waits for its reply until `deadline` (uptime nanoseconds).
    /// A failure closes the connection (its state is no longer known).
    func call(_ arguments: [String], deadline: UInt64) throws(RESPClientError) -> RESPValue {
        try send(arguments, deadline: deadline)
        return try readReply(deadline: deadline)
    }

    func send(_ arguments: [String], deadline: UInt64) throws(RESPClientError) {
        guard socket >= 0 else { throw .closed("not connected") }
        var request = Array("*\(arguments.count)\r\n".utf8)
        for argument in arguments {
            let bytes = Array(argument.utf8)
            request += Array("$\(bytes.count)\r\n".utf8)
            request += bytes
            request += [13, 10]
        }
        var sent = 0
        while sent < request.count {
            let count = request.withUnsafeBytes { Glibc.send(socket, $0.baseAddress! + sent, request.count - sent, Int32(MSG_NOSIGNAL)) }
            if count > 0 {
                sent += count
            } else if count < 0, errno == EAGAIN || errno == EWOULDBLOCK {
                guard wait(events: Int16(POLLOUT), until: deadline) else { close(); throw .timedOut }
            } else if count < 0, errno == EINTR {
                continue
            } else {
                let reason = String(cString: strerror(errno))
                close()
                throw .closed(reason)
            }
        }
    }

    func readReply(deadline: UInt64) throws(RESPClientError) -> RESPValue {
        do {
            let value = try parse(deadline: deadline)
            if position > 4096, position == buffer.count {
                buffer.removeAll(keepingCapacity: true)
                position = 0
            }
            return value
        } catch {
            close()
            throw error
        }
    }

    private func wait(events: Int16, until deadline: UInt64) -> Bool {
        while true {
            let now = DispatchTime.now().uptimeNanoseconds
            guard now < deadline else { return false }
            var descriptor = pollfd(fd: socket, events: events, revents: 0)
            let milliseconds = Int32(min(1000, max(1, (deadline - now) / 1_000_000)))
            let ready = poll(&descriptor, 1, milliseconds)
            if ready > 0 { return true }
            if ready < 0, errno != EINTR { return true } // the next call reports the error
        }
    }

    /// Reads more bytes into the buffer.
    private func fill(deadline: UInt64) throws(RESPClientError) {
        guard buffer.count - position < Self.replyBytesMax else { throw .malformed("reply longer than \(Self.replyBytesMax) bytes") }
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.recv(socket, $0.baseAddress!, $0.count, 0) }
            if count > 0 {
                if position > 0 {
                    buffer.removeFirst(position)
                    position = 0
                }
                buffer += chunk[0..<count]
                return
            }
            if count == 0 { throw .closed("the server closed the connection") }
            if errno == EINTR { continue }
            guard errno == EAGAIN || errno == EWOULDBLOCK else { throw .closed(String(cString: strerror(errno))) }
            guard wait(events: Int16(POLLIN), until: deadline) else { throw .timedOut }
        }
    }

    private func line(deadline: UInt64) throws(RESPClientError) -> String {
        var scanned = position
        while true {
            while scanned + 1 < buffer.count {
                if buffer[scanned] == 13, buffer[scanned + 1] == 10 {
                    let text = String(decoding: buffer[position..<scanned], as: UTF8.self)
                    position = scanned + 2
                    return text
                }
                scanned += 1
            }
            let offset = scanned - position
            try fill(deadline: deadline)
            scanned = position + offset
        }
    }

    private func parse(deadline: UInt64) throws(RESPClientError) -> RESPValue {
        let header = try line(deadline: deadline)
        guard let type = header.first else { throw .malformed("empty line") }
        let rest = String(header.dropFirst())
        switch type {
        case "+": return .simple(rest)
        case "-": return .error(rest)
        case ":":
            guard let value = Int64(rest) else { throw .malformed("integer \(rest)") }
            return .integer(value)
        case "$":
            guard let length = Int(rest), length >= -1, length <= Self.replyBytesMax else { throw .malformed("bulk length \(rest)") }
            if length == -1 { return .bulk(nil) }
            while buffer.count - position < length + 2 { try fill(deadline: deadline) }
            let bytes = Array(buffer[position..<position + length])
            position += length + 2
            return .bulk(bytes)
        case "*":
            guard let count = Int(rest), count >= -1, count <= 1 << 20 else { throw .malformed("array length \(rest)") }
            if count == -1 { return .array(nil) }
            var items: [RESPValue] = []
            items.reserveCapacity(count)
            for _ in 0..<count { items.append(try parse(deadline: deadline)) }
            return .array(items)
        default:
            throw .malformed("type byte \(type)")
        }
    }
}
