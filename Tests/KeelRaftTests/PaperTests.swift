// Raft paper tests, named after the rule and section they check (Ongaro & Ousterhout, "In Search
// of an Understandable Consensus Algorithm", and Ongaro's dissertation for §3.10, §4, §6, §9.6).

import KeelCore
import KeelRaft
import Testing

@Suite("Raft §5.1–§5.2: terms and elections")
struct ElectionTests {
    @Test("§5.2: a follower that hears nothing for an election timeout campaigns, and a majority makes it leader")
    func electionAfterTimeout() {
        let cluster = TestCluster(3)
        cluster.tick(25, only: [1])
        #expect(cluster[1].status.role == .leader)
        #expect(cluster[1].status.term == Term(1))
        #expect(cluster[2].status.leader == NodeID(1) && cluster[3].status.leader == NodeID(1))
    }

    @Test("§5.2: the randomized election timeout lies in [electionTicks, 2 * electionTicks)")
    func randomizedTimeout() {
        for seed in 1...30 {
            let storage = MemoryRaftStorage(membership: Membership(voters: [NodeID(1), NodeID(2), NodeID(3)]))
            let node = try! RaftNode(configuration: RaftConfiguration(id: NodeID(1)), storage: storage, randomSeed: UInt64(seed))
            var ticks = 0
            while node.status.role == .follower && ticks < 100 {
                node.tick()
                ticks += 1
            }
            #expect((10..<20).contains(ticks), "seed \(seed): campaigned after \(ticks) ticks")
        }
    }

    @Test("§5.2: each node votes for at most one candidate in a term, and the vote is in the hard state")
    func oneVotePerTerm() {
        let cluster = TestCluster(3) { $0.preVote = false }
        cluster[1].raft.campaign()
        cluster[2].raft.campaign()
        cluster.processAll()
        // Deliver only the vote requests to node 3: it grants the first and refuses the second.
        let requests = cluster.outbox.filter { $0.kind == .requestVote && $0.to == NodeID(3) }
        #expect(requests.count == 2)
        for request in requests { cluster[3].raft.step(request) }
        cluster.process(NodeID(3))
        let responses = cluster.outbox.filter { $0.kind == .requestVoteResponse && $0.from == NodeID(3) }
        #expect(responses.map(\.reject) == [false, true])
        #expect(cluster[3].storage.hardState.votedFor == requests[0].from)
    }

    @Test("§5.1: a node that sees a higher term adopts it and becomes a follower")
    func higherTermStepsDown() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        #expect(cluster[1].status.role == .leader)
        var message = Message(kind: .appendEntries, from: NodeID(2), to: NodeID(1), term: Term(5))
        message.index = .zero
        cluster[1].raft.step(message)
        #expect(cluster[1].status.role == .follower && cluster[1].status.term == Term(5))
    }

    @Test("§5.4.1: a voter refuses a candidate whose log is less up to date than its own")
    func electionRestriction() {
        let cluster = TestCluster(3) {
            $0.preVote = false
            $0.checkQuorum = false // no lease: the refusal must come from the log comparison
        }
        cluster.elect(1)
        cluster.crash(3)
        try? cluster[1].raft.propose(bytes("x"))
        cluster.stabilize()
        cluster.restart(3)
        cluster.crash(1)
        // Node 3 lacks the entry; node 2 has it and must refuse node 3.
        cluster[3].raft.campaign()
        cluster.stabilize()
        #expect(cluster[3].status.role != .leader)
        #expect(cluster.delivered.contains { $0.kind == .requestVoteResponse && $0.from == NodeID(2) && $0.reject })
    }

    @Test("§9.6 pre-vote: a node cut off and rejoining does not raise its term or disrupt the leader")
    func preVotePreventsDisruption() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        let term = cluster[1].status.term
        cluster.partition([3], [1, 2])
        cluster.tick(60, only: [3])
        #expect(cluster[3].status.term == term, "pre-vote keeps the isolated node's term")
        cluster.heal()
        cluster.tick(3)
        #expect(cluster[1].status.role == .leader && cluster[1].status.term == term)
    }

    @Test("§6.2 check-quorum: a leader cut off from the majority steps down within an election timeout")
    func checkQuorumStepsDown() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.partition([1], [2, 3])
        cluster.tick(25, only: [1])
        #expect(cluster[1].status.role == .follower)
    }

    @Test("§4.2.3: a follower that hears from its leader ignores a vote request with a higher term")
    func leaseIgnoresDisruptiveCandidate() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        var request = Message(kind: .requestVote, from: NodeID(3), to: NodeID(2), term: Term(9))
        request.index = LogIndex(100)
        request.logTerm = Term(9)
        cluster[2].raft.step(request)
        #expect(cluster[2].status.term == Term(1) && cluster[2].status.leader == NodeID(1))
    }

    @Test("a single-node cluster elects itself and commits at its own persist")
    func singleNode() {
        let cluster = TestCluster(1)
        cluster.elect(1)
        try? cluster[1].raft.propose(bytes("solo"))
        cluster.stabilize()
        #expect(cluster.appliedData(1) == ["solo"])
    }
}

@Suite("Raft §5.3–§5.4: log replication and safety")
struct ReplicationTests {
    @Test("§5.3: entries a majority holds are committed and applied everywhere in order")
    func replicateAndCommit() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        for i in 0..<10 { try? cluster[1].raft.propose(bytes("e\(i)")) }
        cluster.stabilize()
        cluster.tick(2)
        for id in 1...3 {
            #expect(cluster.appliedData(UInt64(id)) == (0..<10).map { "e\($0)" })
        }
    }

    @Test("§8: a new leader appends a no-op entry of its term")
    func noOpAtStartOfTerm() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        let first = cluster[1].storage.entries.first
        #expect(first?.term == Term(1) && first?.data.isEmpty == true && first?.kind == .normal)
    }

    @Test("§5.3: a follower with a conflicting suffix has it replaced, with fast backtracking")
    func conflictingSuffixRepaired() {
        let cluster = TestCluster(3) { $0.preVote = false }
        cluster.elect(1)
        // Node 1 leads, is cut off, and appends entries nobody else gets.
        cluster.partition([1], [2, 3])
        for i in 0..<20 { try? cluster[1].raft.propose(bytes("lost\(i)")) }
        cluster.stabilize()
        // The majority elects a new leader once node 1's lease has run out, and commits other entries.
        cluster.tick(40, only: [2, 3])
        guard let leader = [cluster[2], cluster[3]].first(where: { $0.status.role == .leader }) else {
            Issue.record("the majority elected no leader")
            return
        }
        for i in 0..<5 { try? leader.raft.propose(bytes("kept\(i)")) }
        cluster.stabilize()
        cluster.heal()
        cluster.delivered = []
        cluster.tick(3)
        #expect(cluster[1].status.role == .follower)
        #expect(cluster.appliedData(1) == (0..<5).map { "kept\($0)" })
        let rejections = cluster.delivered.filter { $0.kind == .appendEntriesResponse && $0.from == NodeID(1) && $0.reject }
        #expect(rejections.count <= 2, "fast backtracking finds the divergence in few round trips, not one per entry (\(rejections.count))")
    }

    @Test("§5.4.2: a leader does not commit an entry of an older term by counting replicas (Figure 8)")
    func noCommitByCountingOlderTerms() {
        /// Node 1 holds an entry of term 1 that nobody else has, becomes leader of term 2, and then
        /// learns that node 2 holds that entry too: a majority holds it, but it is of an older term.
        func commitAfterOldEntryReachesMajority(faulty: Bool) -> (commit: LogIndex, old: LogIndex) {
            let cluster = TestCluster(3) {
                $0.preVote = false
                $0.checkQuorum = false
                $0.faults.commitEntriesOfOlderTerms = faulty
            }
            cluster.elect(1)
            cluster.partition([1], [2, 3])
            try? cluster[1].raft.propose(bytes("old")) // only on node 1
            cluster.stabilize()
            let old = cluster[1].status.lastIndex
            let oldTerm = cluster[1].status.term
            cluster.outbox = []
            // Node 1 learns of a later term (it lost leadership), then wins the next election.
            cluster[1].raft.step(Message(kind: .heartbeatResponse, from: NodeID(3), to: NodeID(1), term: Term(5)))
            cluster[1].raft.campaign()
            cluster.process(NodeID(1))
            let term = cluster[1].status.term
            cluster[1].raft.step(Message(kind: .requestVoteResponse, from: NodeID(2), to: NodeID(1), term: term))
            cluster.process(NodeID(1))
            #expect(cluster[1].status.role == .leader && term > oldTerm)
            var ack = Message(kind: .appendEntriesResponse, from: NodeID(2), to: NodeID(1), term: term)
            ack.index = old // node 2 now holds the old entry, but nothing of the new term
            cluster[1].raft.step(ack)
            cluster.process(NodeID(1))
            return (cluster[1].status.commitIndex, old)
        }
        let correct = commitAfterOldEntryReachesMajority(faulty: false)
        #expect(correct.commit < correct.old, "an entry of an older term is not committed by counting its replicas")
        let faulty = commitAfterOldEntryReachesMajority(faulty: true)
        #expect(faulty.commit == faulty.old, "the fault commits it, which the simulator must catch")
    }

    @Test("batching: an AppendEntries carries at most messageEntriesMax entries")
    func batchingLimit() {
        let cluster = TestCluster(3) { $0.messageEntriesMax = 4 }
        cluster.elect(1)
        cluster.crash(3)
        for i in 0..<30 { try? cluster[1].raft.propose(bytes("b\(i)")) }
        cluster.stabilize()
        cluster.restart(3)
        cluster.delivered = []
        cluster.tick(5)
        let appends = cluster.delivered.filter { $0.kind == .appendEntries && $0.to == NodeID(3) }
        #expect(!appends.isEmpty && appends.allSatisfy { $0.entries.count <= 4 })
        #expect(cluster.appliedData(3).count == 30)
    }

    @Test("pipelining: no more than inflightAppendsMax appends are in flight to one follower")
    func pipeliningLimit() {
        let cluster = TestCluster(3) { $0.inflightAppendsMax = 3 }
        cluster.elect(1)
        cluster.outbox = []
        for i in 0..<20 { try? cluster[1].raft.propose(bytes("p\(i)")) }
        cluster.process(NodeID(1))
        let appends = cluster.outbox.filter { $0.kind == .appendEntries && $0.to == NodeID(2) && !$0.entries.isEmpty }
        #expect(appends.count == 3)
        cluster.stabilize()
        #expect(cluster.appliedData(2).count == 20)
    }

    @Test("pipelining: a follower whose window filled with lost appends gets replication back after it answers a heartbeat")
    func fullWindowRecovers() {
        let cluster = TestCluster(3) { $0.inflightAppendsMax = 2 }
        cluster.elect(1)
        try? cluster[1].raft.propose(bytes("first"))
        cluster.stabilize()
        cluster.partition([1], [3])
        for i in 0..<10 { try? cluster[1].raft.propose(bytes("w\(i)")) }
        cluster.stabilize() // every append to node 3 is lost; its window fills
        cluster.heal()
        cluster.tick(6)
        #expect(cluster.appliedData(3) == ["first"] + (0..<10).map { "w\($0)" })
    }

    @Test("a proposal with no leader fails at once with .noLeader")
    func proposalWithoutLeader() {
        let cluster = TestCluster(3)
        #expect(throws: RaftError.noLeader) { try cluster[1].raft.propose(bytes("x")) }
    }

    @Test("followers forward proposals to the leader")
    func forwarding() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try? cluster[3].raft.propose(bytes("via-3"))
        cluster.stabilize()
        cluster.tick(1)
        #expect(cluster.appliedData(1) == ["via-3"])
        #expect(cluster.delivered.contains { $0.kind == .propose && $0.from == NodeID(3) && $0.to == NodeID(1) })
    }
}

@Suite("Raft §6.4: linearizable reads")
struct ReadTests {
    @Test("§6.4 ReadIndex: the leader answers after a heartbeat round confirms it still leads")
    func readIndexOnLeader() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try? cluster[1].raft.propose(bytes("w"))
        cluster.stabilize()
        cluster.delivered = []
        try? cluster[1].raft.readIndex(context: bytes("r1"))
        cluster.process(NodeID(1))
        #expect(cluster[1].readStates.isEmpty, "no answer before a quorum confirms")
        cluster.stabilize()
        #expect(cluster[1].readStates == [ReadState(index: cluster[1].status.commitIndex, context: bytes("r1"))])
        #expect(cluster.delivered.contains { $0.kind == .heartbeatResponse && !$0.context.isEmpty }, "confirmed by a heartbeat round that carries the read")
    }

    @Test("§6.4 ReadIndex through a follower: it asks the leader and gets the index back")
    func readIndexOnFollower() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try? cluster[2].raft.readIndex(context: bytes("r2"))
        cluster.stabilize()
        #expect(cluster[2].readStates.map(\.context) == [bytes("r2")])
        #expect(cluster[2].readStates.first!.index >= LogIndex(1))
    }

    @Test("§6.4: a follower drops a read request another node relayed to it (the answer could not go back), and relays its own")
    func relayedReadDropped() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.stabilize()
        // Node 3 took node 2 for the leader: node 2 must not pass the request on as node 3's
        // (a peer accepts only messages from the node it is connected to).
        var request = Message(kind: .readIndex, from: NodeID(3), to: NodeID(2), term: .zero)
        request.context = bytes("from three")
        cluster[2].raft.step(request)
        cluster.process(NodeID(2))
        #expect(!cluster.outbox.contains { $0.kind == .readIndex }, "nothing relayed")
        try? cluster[2].raft.readIndex(context: bytes("own"))
        cluster.process(NodeID(2))
        #expect(cluster.outbox.contains { $0.kind == .readIndex && $0.from == NodeID(2) && $0.to == NodeID(1) }, "its own request goes to the leader")
    }

    @Test("§8: a follower drops a proposal another node relayed to it (a stale one would commit long after its caller gave up), and relays its own")
    func relayedProposalDropped() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.stabilize()
        var relayed = Message(kind: .propose, from: NodeID(3), to: NodeID(2), term: .zero)
        relayed.entries = [Entry(index: .zero, term: .zero, kind: .normal, data: bytes("stale"))]
        cluster[2].raft.step(relayed)
        cluster.stabilize()
        #expect(!cluster[1].applied.contains { $0.data == bytes("stale") }, "the relayed proposal was not committed")
        try? cluster[2].raft.propose(bytes("own"))
        cluster.stabilize()
        #expect(cluster[1].applied.contains { $0.data == bytes("own") }, "its own proposal is")
    }

    @Test("§6.4: a leader cut off from the majority never answers a read index")
    func deposedLeaderCannotRead() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.partition([1], [2, 3])
        try? cluster[1].raft.readIndex(context: bytes("stale"))
        cluster.stabilize()
        cluster.tick(30, only: [1])
        #expect(cluster[1].readStates.isEmpty)
    }

    @Test("lease reads are answered at once while a majority acknowledged a recent heartbeat, not after, and are refused as a setting without check-quorum")
    func leaseReads() {
        let cluster = TestCluster(3) { $0.readConsistency = .lease }
        cluster.elect(1)
        cluster.tick(1)
        try? cluster[1].raft.readIndex(context: bytes("lease"))
        cluster.process(NodeID(1))
        #expect(cluster[1].readStates.map(\.context) == [bytes("lease")])
        // Cut off: once no majority acknowledged a heartbeat within an election timeout, the
        // lease is gone (another leader may exist) and the read waits for a quorum instead.
        cluster.partition([1], [2, 3])
        cluster.tick(9, only: [1])
        try? cluster[1].raft.readIndex(context: bytes("late"))
        cluster.stabilize()
        #expect(cluster[1].readStates.map(\.context) == [bytes("lease")], "no answer from an expired lease")
        var configuration = RaftConfiguration(id: NodeID(1))
        configuration.readConsistency = .lease
        configuration.checkQuorum = false
        #expect(throws: RaftError.self) { try configuration.validate() }
    }
}

@Suite("Raft §3.10, §4, §7: transfer, membership, snapshots")
struct MembershipAndSnapshotTests {
    @Test("§3.10 leadership transfer: the target becomes leader, and proposals are refused meanwhile")
    func transfer() throws {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try cluster[1].raft.transferLeadership(to: NodeID(3))
        #expect(throws: RaftError.leadershipTransferInProgress) { try cluster[1].raft.propose(bytes("x")) }
        cluster.stabilize()
        #expect(cluster[3].status.role == .leader)
        #expect(cluster[1].status.role == .follower)
    }

    @Test("§4.1: a change waits for an entry of the leader's term to commit, and only one is pending at a time")
    func oneChangeAtATime() throws {
        let cluster = TestCluster(3)
        cluster[1].raft.campaign()
        cluster.processAll()
        // Elected, but the no-op is not committed yet.
        var rounds = 0
        while cluster[1].status.role != .leader && rounds < 100 {
            if cluster.outbox.isEmpty { break }
            let message = cluster.outbox.removeFirst()
            cluster[Int(message.to.rawValue) == 0 ? 1 : message.to.rawValue].raft.step(message)
            cluster.process(message.to)
            rounds += 1
        }
        #expect(cluster[1].status.role == .leader)
        if cluster[1].status.commitIndex < cluster[1].status.lastIndex {
            #expect(throws: RaftError.leaderNotReady) { try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.addLearner, NodeID(4))) }
        }
        cluster.stabilize()
        cluster.addNode(4)
        try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.addLearner, NodeID(4)))
        #expect(throws: RaftError.configurationChangeInProgress) {
            try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.addLearner, NodeID(5)))
        }
    }

    @Test("§4.2.1 learners: a learner gets the log but neither votes nor counts towards commit, and can be promoted")
    func learners() throws {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.addNode(4)
        try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.addLearner, NodeID(4)))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster[1].status.membership.learners == [NodeID(4)])
        try cluster[1].raft.propose(bytes("to-learner"))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster.appliedData(4) == ["to-learner"])
        // With both other voters down, the learner does not make a quorum.
        cluster.crash(2)
        cluster.crash(3)
        try cluster[1].raft.propose(bytes("stuck"))
        cluster.stabilize()
        #expect(!cluster.appliedData(1).contains("stuck"))
        cluster.tick(40, only: [4])
        #expect(cluster[4].status.role == .follower, "a learner never campaigns")
        cluster.restart(2)
        cluster.restart(3)
        cluster.tick(40)
        let leader = try #require(cluster.leader)
        try leader.raft.proposeConfigurationChange(ConfigurationChange(.promoteLearner, NodeID(4)))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster[4].status.membership.voters.contains(NodeID(4)))
    }

    @Test("§4.1: removing a member lets the rest go on; a removed leader steps down")
    func removeLeader() throws {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.remove, NodeID(1)))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster[1].status.role == .follower)
        cluster.tick(40)
        let leader = try #require(cluster.leader)
        #expect(leader.id != NodeID(1))
        #expect(leader.status.membership.voters == [NodeID(2), NodeID(3)])
        try leader.raft.propose(bytes("after-removal"))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster.appliedData(leader.id.rawValue).contains("after-removal"))
    }

    @Test("a member removed by a leader that has not heard from it yet (just handed the lead) still learns its removal")
    func removedByNewLeaderLearns() throws {
        let cluster = TestCluster(3)
        cluster.elect(1)
        try cluster[1].raft.propose(bytes("before"))
        cluster.stabilize()
        // Node 3's answers never reach node 2, which then leads without knowing what 3 holds.
        cluster.cut.insert([3, 2])
        try cluster[1].raft.transferLeadership(to: NodeID(2))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster[2].status.role == .leader)
        try cluster[2].raft.proposeConfigurationChange(ConfigurationChange(.remove, NodeID(3)))
        cluster.stabilize()
        cluster.tick(2)
        #expect(cluster[2].status.membership.voters == [NodeID(1), NodeID(2)])
        #expect(!cluster[3].status.membership.contains(NodeID(3)), "node 3 learned that its removal committed")
    }

    @Test("removing the last voter is refused")
    func cannotRemoveLastVoter() {
        let cluster = TestCluster(1)
        cluster.elect(1)
        #expect(throws: RaftError.self) { try cluster[1].raft.proposeConfigurationChange(ConfigurationChange(.remove, NodeID(1))) }
    }

    @Test("§7: a follower that needs compacted entries gets the snapshot in chunks, then the log after it")
    func snapshotInChunks() throws {
        let cluster = TestCluster(3) { $0.snapshotChunkSizeMax = 5 }
        cluster.elect(1)
        cluster.crash(3)
        for i in 0..<10 { try cluster[1].raft.propose(bytes("s\(i)")) }
        cluster.stabilize()
        cluster.tick(2)
        let applied = cluster[1].status.appliedIndex
        cluster[1].storage.createSnapshot(at: applied, membership: cluster[1].status.membership, data: Array("state-at-\(applied)".utf8))
        try cluster[1].raft.propose(bytes("after"))
        cluster.stabilize()
        cluster.restart(3)
        cluster.tick(6)
        let chunks = cluster.delivered.filter { $0.kind == .installSnapshot && $0.to == NodeID(3) }
        #expect(chunks.count >= 3, "the snapshot arrives in chunks of at most 5 bytes")
        #expect(chunks.allSatisfy { $0.snapshotData.count <= 5 })
        #expect(cluster[3].installedSnapshots.map(\.index) == [applied])
        #expect(cluster[3].storage.snapshotData == Array("state-at-\(applied)".utf8))
        #expect(cluster.appliedData(3) == ["after"])
    }

    @Test("§7: a lost snapshot chunk is sent again and the transfer resumes where it stopped")
    func snapshotResumes() throws {
        let cluster = TestCluster(3) { $0.snapshotChunkSizeMax = 4 }
        cluster.elect(1)
        cluster.crash(3)
        for i in 0..<6 { try cluster[1].raft.propose(bytes("r\(i)")) }
        cluster.stabilize()
        cluster.tick(2)
        let applied = cluster[1].status.appliedIndex
        cluster[1].storage.createSnapshot(at: applied, membership: cluster[1].status.membership, data: Array(repeating: 7, count: 40))
        // Lose the second and third chunks on their first sending.
        var dropped = 0
        cluster.lose = { message in
            if message.kind == .installSnapshot && message.to == NodeID(3) && message.snapshotOffset > 0 && dropped < 2 {
                dropped += 1
                return true
            }
            return false
        }
        cluster.restart(3)
        cluster.tick(40)
        #expect(dropped == 2)
        #expect(cluster[3].storage.snapshotData == Array(repeating: 7, count: 40))
        #expect(cluster[3].status.commitIndex >= applied)
    }
}

@Suite("Raft: malformed messages")
struct MalformedMessageTests {
    @Test("messages with out-of-range numbers, gaps in their entries or forged replies are dropped, not trapped on")
    func malformedMessagesAreDropped() {
        let cluster = TestCluster(3)
        cluster.elect(1)
        let before = cluster[2].status
        var gap = Message(kind: .appendEntries, from: NodeID(1), to: NodeID(2), term: before.term)
        gap.index = before.lastIndex
        gap.logTerm = before.term
        gap.entries = [Entry(index: LogIndex(before.lastIndex.rawValue + 5), term: before.term, data: [1])]
        cluster[2].raft.step(gap)
        var huge = Message(kind: .heartbeat, from: NodeID(1), to: NodeID(2), term: Term(UInt64.max))
        huge.commit = LogIndex(UInt64.max)
        cluster[2].raft.step(huge)
        var negative = Message(kind: .installSnapshot, from: NodeID(1), to: NodeID(2), term: before.term)
        negative.snapshotOffset = -5
        negative.snapshot = SnapshotMetadata(index: LogIndex(10), term: before.term, membership: before.membership)
        cluster[2].raft.step(negative)
        cluster[2].raft.checkInvariants()
        #expect(cluster[2].status.term == before.term && cluster[2].status.lastIndex == before.lastIndex)

        var forged = Message(kind: .appendEntriesResponse, from: NodeID(2), to: NodeID(1), term: cluster[1].status.term)
        forged.index = LogIndex(1_000_000)
        cluster[1].raft.step(forged)
        cluster[1].raft.checkInvariants()
        #expect(cluster[1].status.matchIndex[NodeID(2)]! <= cluster[1].status.lastIndex)
        var overflow = Message(kind: .appendEntriesResponse, from: NodeID(2), to: NodeID(1), term: cluster[1].status.term)
        overflow.reject = true
        overflow.index = cluster[1].status.lastIndex
        overflow.rejectHint = LogIndex(UInt64.max)
        cluster[1].raft.step(overflow)
        cluster[1].raft.checkInvariants()
    }
}

@Suite("Raft: batched proposals")
struct BatchProposalTests {
    @Test("propose(batch:) appends every entry and replicates them in one AppendEntries per follower")
    func batchedProposal() throws {
        let cluster = TestCluster(3)
        cluster.elect(1)
        cluster.outbox = []
        try cluster[1].raft.propose(batch: (0..<5).map { bytes("b\($0)") })
        cluster.process(NodeID(1))
        let appends = cluster.outbox.filter { $0.kind == .appendEntries && $0.to == NodeID(2) }
        #expect(appends.count == 1 && appends.first?.entries.count == 5)
        cluster.stabilize()
        cluster.tick(1)
        #expect(cluster.appliedData(3) == (0..<5).map { "b\($0)" })
        // Through a follower: forwarded as one message.
        try cluster[2].raft.propose(batch: [bytes("f1"), bytes("f2")])
        cluster.stabilize()
        cluster.tick(1)
        #expect(cluster.appliedData(1).suffix(2) == ["f1", "f2"])
    }
}
