// The store's dictionaries: a persistent hash trie (a HAMT) that keeps its keys in the numeric
// order of their 64-bit hash values.
//
// - A copy is O(1): nodes are shared, and a write copies the nodes on its path that are shared
//   (a checkpoint writes out a copy while `apply` goes on).
// - Iteration visits keys in hash order and can start at any hash value. A key's place never
//   depends on the other keys, so a walk resumed from a hash value (SCAN's cursor) visits every
//   key that stays in the trie throughout exactly once, whatever is added or removed meanwhile.
//   (TreeDictionary, which this replaces, orders a node's keys before its subtrees: a key moves
//   when another lands next to it, so no position in it survives a write.)
//
// Level 0 takes the hash's top 6 bits, each level the next 6, and level 10 the last 4 (64-way
// nodes: at a million keys a lookup visits about 4 nodes, each a likely cache miss). A key sits
// in the first level where no other key shares its bits so far; keys whose whole hashes are equal
// share one collision slot. A node holds exactly its occupied slots, in bucket order; every node
// but the root holds at least two keys (a removal that leaves a lone key moves it up).
//
// The hash is Swift's `hashValue` (SipHash, seeded per process): stable while the process runs,
// different in another process (see docs/server.md on SCAN across restarts and nodes).

import CKeelSystemShims

public struct HashTrie<Key: Hashable, Value> {
    var root: Node
    /// The number of keys.
    public private(set) var count: Int

    public init() {
        root = Node.make(capacity: 0)
        count = 0
    }

    public var isEmpty: Bool { count == 0 }

    /// The hash that orders `key`.
    public static func hash(_ key: Key) -> UInt64 { UInt64(bitPattern: Int64(key.hashValue)) }

    static var lastLevel: Int { 10 }

    @inline(__always)
    static func bucket(_ hash: UInt64, _ level: Int) -> Int {
        level < lastLevel ? Int(truncatingIfNeeded: hash >> UInt64(58 - 6 * level)) & 63 : Int(truncatingIfNeeded: hash) & 15
    }

    // MARK: - Nodes

    final class Collision {
        let hash: UInt64
        let items: [(key: Key, value: Value)]
        init(hash: UInt64, items: [(key: Key, value: Value)]) {
            self.hash = hash
            self.items = items
        }
    }

    enum Slot {
        case item(Key, Value)
        case child(Node)
        case collision(Collision)
    }

    struct Header {
        var bitmap: UInt64
        var count: Int32
        var capacity: Int32
    }

    final class Node: ManagedBuffer<Header, Slot> {
        static func make(capacity: Int) -> Node {
            let buffer = Node.create(minimumCapacity: capacity) { _ in Header(bitmap: 0, count: 0, capacity: Int32(capacity)) }
            return unsafeDowncast(buffer, to: Node.self)
        }

        deinit {
            _ = withUnsafeMutablePointers { header, slots in slots.deinitialize(count: Int(header.pointee.count)) }
        }

        /// The header, through its address: `ManagedBuffer.header` is a class's stored property,
        /// so each use of it is checked for exclusive access at run time, several times a level on
        /// the write path (the slots are reached the same way, below).
        @inline(__always)
        var head: UnsafeMutablePointer<Header> { withUnsafeMutablePointerToHeader { $0 } }

        @inline(__always) var bitmap: UInt64 { head.pointee.bitmap }
        @inline(__always) var slotCount: Int { Int(head.pointee.count) }

        @inline(__always)
        var slots: UnsafeMutablePointer<Slot> { withUnsafeMutablePointerToElements { $0 } }

        @inline(__always)
        func has(_ bucket: Int) -> Bool { head.pointee.bitmap & (1 << UInt64(bucket)) != 0 }

        /// The position of `bucket`'s slot (or where it would go).
        @inline(__always)
        func position(_ bucket: Int) -> Int { (head.pointee.bitmap & ((1 << UInt64(bucket)) &- 1)).nonzeroBitCount }

        /// A copy that shares the slots' contents.
        func copy(extra: Int = 0) -> Node {
            let node = Node.make(capacity: slotCount + extra)
            node.slots.initialize(from: slots, count: slotCount)
            node.head.pointee.bitmap = head.pointee.bitmap
            node.head.pointee.count = head.pointee.count
            return node
        }

        /// A node with `slot` added at `bucket`. Moves this node's slots out when `consume` (it is
        /// then left empty), copies them otherwise.
        func inserting(_ slot: Slot, at bucket: Int, consume: Bool) -> Node {
            let at = position(bucket)
            let count = slotCount
            let bitmap = self.bitmap
            let node = Node.make(capacity: count + 1)
            let source = slots
            let target = node.slots
            if consume {
                target.moveInitialize(from: source, count: at)
                (target + at + 1).moveInitialize(from: source + at, count: count - at)
                head.pointee.count = 0
                head.pointee.bitmap = 0
            } else {
                target.initialize(from: source, count: at)
                (target + at + 1).initialize(from: source + at, count: count - at)
            }
            (target + at).initialize(to: slot)
            node.head.pointee.bitmap = bitmap | (1 << UInt64(bucket))
            node.head.pointee.count = Int32(count + 1)
            return node
        }

        /// Removes the slot at `bucket` in place (the node must not be shared).
        func remove(at bucket: Int) {
            let at = position(bucket)
            let count = slotCount
            let slots = self.slots
            (slots + at).deinitialize(count: 1)
            (slots + at).moveInitialize(from: slots + at + 1, count: count - at - 1)
            head.pointee.count = Int32(count - 1)
            head.pointee.bitmap &= ~(1 << UInt64(bucket))
        }
    }

    /// The hash every key in `slot` has (for an item, its key's; for a collision, the shared one).
    static func slotHash(_ slot: Slot) -> UInt64 {
        switch slot {
        case .item(let key, _): hash(key)
        case .collision(let collision): collision.hash
        case .child: preconditionFailure("a subtree has no single hash")
        }
    }

    /// A node at `level` holding two slots whose hashes differ (or one collision, if they do not).
    static func pair(_ a: Slot, _ hashA: UInt64, _ b: Slot, _ hashB: UInt64, level: Int) -> Node {
        let bucketA = bucket(hashA, level)
        let bucketB = bucket(hashB, level)
        if bucketA != bucketB {
            let node = Node.make(capacity: 2)
            let (first, second) = bucketA < bucketB ? (a, b) : (b, a)
            node.slots.initialize(to: first)
            (node.slots + 1).initialize(to: second)
            node.head.pointee.bitmap = (1 << UInt64(bucketA)) | (1 << UInt64(bucketB))
            node.head.pointee.count = 2
            return node
        }
        let node = Node.make(capacity: 1)
        node.head.pointee.bitmap = 1 << UInt64(bucketA)
        node.head.pointee.count = 1
        if level == lastLevel {
            // Every bit agrees: the two hashes are equal.
            node.slots.initialize(to: .collision(Collision(hash: hashA, items: items(a) + items(b))))
        } else {
            node.slots.initialize(to: .child(pair(a, hashA, b, hashB, level: level + 1)))
        }
        return node
    }

    static func items(_ slot: Slot) -> [(key: Key, value: Value)] {
        switch slot {
        case .item(let key, let value): [(key, value)]
        case .collision(let collision): collision.items
        case .child: preconditionFailure("a subtree is not a list of items")
        }
    }

    // MARK: - Lookup

    public subscript(key: Key) -> Value? {
        get { find(key, hash: Self.hash(key)) }
        set {
            if let newValue { updateValue(newValue, forKey: key) } else { removeValue(forKey: key) }
        }
    }

    func find(_ key: Key, hash: UInt64) -> Value? {
        // Not retained on the way down: the trie is borrowed for the call, so its nodes live, and
        // retaining each node (an atomic operation on a line that is likely not in cache) and
        // releasing it again took a third of a lookup.
        unowned(unsafe) var node = root
        var level = 0
        while true {
            let bucket = Self.bucket(hash, level)
            guard node.has(bucket) else { return nil }
            switch node.slots[node.position(bucket)] {
            case .item(let found, let value):
                return found == key ? value : nil
            case .child(let child):
                node = child
                level += 1
            case .collision(let collision):
                guard collision.hash == hash else { return nil }
                return collision.items.first { $0.key == key }?.value
            }
        }
    }

    // MARK: - Prefetching

    /// Starts loading into the cache what finding or updating the keys with these hashes will
    /// touch: each node on the way and the slot at its end (and, through `itemPrefetch`, what an
    /// item there points to). Changes nothing: a hint before a batch is applied. All the walks go
    /// down together, one level a round, each round reading what the last one asked for, so the
    /// cache misses of different keys overlap instead of coming one after another (a lookup
    /// among 100,000 keys meets about four, each as long as hundreds of instructions).
    func prefetch(_ hashes: [UInt64], itemPrefetch: (UnsafePointer<Slot>) -> Void) {
        guard hashes.count > 1 else { return }
        // Walks still going, by the node they are at (nil: done). Not retained: the trie is
        // borrowed for the call, so its nodes live, and a retain is a write to a line that is
        // likely not in cache yet (the wait this is here to avoid).
        var walks = [Unmanaged<Node>?](repeating: Unmanaged.passUnretained(root), count: hashes.count)
        var going = hashes.count
        var level = 0
        while going > 0, level <= Self.lastLevel {
            // The slot each walk's bucket holds, in the node whose header the last round loaded.
            for index in walks.indices {
                guard let walk = walks[index] else { continue }
                let bucket = Self.bucket(hashes[index], level)
                let found = walk._withUnsafeGuaranteedRef { node -> Bool in
                    guard node.has(bucket) else { return false }
                    ckeel_prefetch(node.slots + node.position(bucket))
                    return true
                }
                if !found {
                    walks[index] = nil
                    going -= 1
                }
            }
            // Down into a child (its header next), or, at an item, to what the item points to.
            for index in walks.indices {
                guard let walk = walks[index] else { continue }
                let bucket = Self.bucket(hashes[index], level)
                let child = walk._withUnsafeGuaranteedRef { node -> Unmanaged<Node>? in
                    let slot = node.slots + node.position(bucket)
                    if case .child(let child) = slot.pointee {
                        let next = Unmanaged.passUnretained(child)
                        ckeel_prefetch(next.toOpaque())
                        return next
                    }
                    if case .item = slot.pointee { itemPrefetch(UnsafePointer(slot)) }
                    return nil
                }
                walks[index] = child
                if child == nil { going -= 1 }
            }
            level += 1
        }
    }

    // MARK: - Changes

    /// Sets the value of `key` and returns the value it replaced (nil if the key was new).
    @discardableResult
    public mutating func updateValue(_ value: Value, forKey key: Key) -> Value? {
        let hash = Self.hash(key)
        var inserted = false
        let old = Self.update(&root, key, value, hash: hash, level: 0, inserted: &inserted)
        if inserted { count += 1 }
        return old
    }

    static func update(_ node: inout Node, _ key: Key, _ value: Value, hash: UInt64, level: Int, inserted: inout Bool) -> Value? {
        let bucket = Self.bucket(hash, level)
        let unique = isKnownUniquelyReferenced(&node)
        guard node.has(bucket) else {
            inserted = true
            node = node.inserting(.item(key, value), at: bucket, consume: unique)
            return nil
        }
        if !unique { node = node.copy() }
        let slot = node.slots + node.position(bucket)
        switch slot.pointee {
        case .item, .collision:
            // Moved out, not copied: no retain and release of the key and the old value (each a
            // likely cache miss) on the way to replacing them.
            let existing = slot.move()
            if case .item(let found, let old) = existing, found == key {
                slot.initialize(to: .item(found, value))
                return old
            }
            let existingHash = slotHash(existing)
            if case .collision(let collision) = existing, existingHash == hash {
                var items = collision.items
                if let at = items.firstIndex(where: { $0.key == key }) {
                    let old = items[at].value
                    items[at].value = value
                    slot.initialize(to: .collision(Collision(hash: hash, items: items)))
                    return old
                }
                inserted = true
                slot.initialize(to: .collision(Collision(hash: hash, items: items + [(key, value)])))
                return nil
            }
            inserted = true
            if level == lastLevel {
                // Every bit agrees.
                slot.initialize(to: .collision(Collision(hash: hash, items: items(existing) + [(key, value)])))
            } else {
                slot.initialize(to: .child(pair(existing, existingHash, .item(key, value), hash, level: level + 1)))
            }
            return nil
        case .child:
            // Taken out of the slot while it changes, so that only this path holds it (and it
            // changes in place when nothing else shares it).
            guard case .child(var child) = slot.move() else { preconditionFailure() }
            let old = update(&child, key, value, hash: hash, level: level + 1, inserted: &inserted)
            slot.initialize(to: .child(child))
            return old
        }
    }

    /// Removes `key` and returns its value (nil if it was absent).
    @discardableResult
    public mutating func removeValue(forKey key: Key) -> Value? {
        let hash = Self.hash(key)
        // Only a key that is there changes anything (a miss copies no shared node).
        guard let old = find(key, hash: hash) else { return nil }
        Self.remove(&root, key, hash: hash, level: 0)
        count -= 1
        return old
    }

    /// Removes a key that is in the subtree.
    static func remove(_ node: inout Node, _ key: Key, hash: UInt64, level: Int) {
        if !isKnownUniquelyReferenced(&node) { node = node.copy() }
        let bucket = Self.bucket(hash, level)
        let slot = node.slots + node.position(bucket)
        switch slot.pointee {
        case .item:
            node.remove(at: bucket)
        case .collision(let collision):
            let rest = collision.items.filter { $0.key != key }
            slot.pointee = rest.count == 1 ? .item(rest[0].key, rest[0].value) : .collision(Collision(hash: hash, items: rest))
        case .child:
            guard case .child(var child) = slot.move() else { preconditionFailure() }
            remove(&child, key, hash: hash, level: level + 1)
            // A subtree left with one key (or one collision) gives it up to this level.
            if child.slotCount == 1, case let lone = child.slots.pointee, !lone.isChild {
                slot.initialize(to: lone)
            } else {
                slot.initialize(to: .child(child))
            }
        }
    }

    // MARK: - Iteration

    /// Walks the keys in hash order.
    public struct Iterator: IteratorProtocol {
        var stack: [(node: Node, index: Int)]
        var collision: (items: [(key: Key, value: Value)], index: Int)?

        public mutating func next() -> (key: Key, value: Value)? {
            if let (items, index) = collision {
                if index < items.count {
                    collision = (items, index + 1)
                    return items[index]
                }
                collision = nil
            }
            while let (node, index) = stack.last {
                guard index < node.slotCount else {
                    stack.removeLast()
                    continue
                }
                stack[stack.count - 1].index = index + 1
                switch node.slots[index] {
                case .item(let key, let value):
                    return (key, value)
                case .child(let child):
                    stack.append((child, 0))
                case .collision(let group):
                    collision = (group.items, 1)
                    return group.items[0]
                }
            }
            return nil
        }
    }

    /// The keys whose hashes are `start` or above, in hash order.
    public func elements(from start: UInt64) -> Iterator {
        var iterator = Iterator(stack: [], collision: nil)
        var node = root
        var level = 0
        while true {
            let bucket = Self.bucket(start, level)
            let at = node.position(bucket)
            guard node.has(bucket) else {
                iterator.stack.append((node, at))
                return iterator
            }
            switch node.slots[at] {
            case .child(let child):
                // Past this subtree, the rest of this node comes after `start`.
                iterator.stack.append((node, at + 1))
                node = child
                level += 1
            case let slot:
                iterator.stack.append((node, Self.slotHash(slot) >= start ? at : at + 1))
                return iterator
            }
        }
    }
}

extension HashTrie.Slot {
    var isChild: Bool {
        if case .child = self { return true }
        return false
    }
}

extension HashTrie: Sequence {
    public func makeIterator() -> Iterator { Iterator(stack: [(root, 0)], collision: nil) }
    public var underestimatedCount: Int { count }
}

// Shared nodes are never changed (a write copies them first), so copies may cross threads.
extension HashTrie: @unchecked Sendable where Key: Sendable, Value: Sendable {}

extension HashTrie where Key == KeyBytes, Value == StoredValue {
    /// `prefetch` for the store's keys: also the bytes of the key an item holds (compared on the
    /// way to an update) and of its value (released when replaced).
    public func prefetch(_ hashes: [UInt64]) {
        prefetch(hashes) { slot in
            // The item's payload is the key, then the value, each beginning with its array's
            // buffer (`itemAddresses` gives both; a test checks them against the item itself).
            let (key, value) = Self.itemAddresses(slot)
            ckeel_prefetch(key)
            ckeel_prefetch(value)
        }
    }

    /// The buffers of the key's and the value's bytes in an item slot, read as raw words so that
    /// neither is retained (a retain writes to the line the prefetch is to load). Only a hint
    /// uses them: a prefetch of any address is harmless.
    static func itemAddresses(_ slot: UnsafePointer<Slot>) -> (key: UnsafeRawPointer?, value: UnsafeRawPointer?) {
        let raw = UnsafeRawPointer(slot)
        return (raw.load(as: UnsafeRawPointer?.self), raw.load(fromByteOffset: MemoryLayout<KeyBytes>.stride, as: UnsafeRawPointer?.self))
    }
}
