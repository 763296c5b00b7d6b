package kvcache

import (
	"errors"
	"testing"
)

func TestReserveAndFree(t *testing.T) {
	m := NewBlockManager(5, 4)
	if err := m.Reserve(1, 6); err != nil { // 2 blocks
		t.Fatal(err)
	}
	if err := m.Reserve(2, 8); err != nil { // 2 blocks
		t.Fatal(err)
	}
	if got := m.NumFree(); got != 1 {
		t.Fatalf("free %d, want 1", got)
	}
	if err := m.Reserve(1, 8); err != nil { // still 2 blocks
		t.Fatal(err)
	}
	err := m.Reserve(2, 17) // needs 3 more
	if !errors.Is(err, ErrNoBlocks) {
		t.Fatalf("err %v, want ErrNoBlocks", err)
	}
	if len(m.Table(2)) != 2 || m.NumFree() != 1 {
		t.Fatalf("failed reserve changed state: table %v free %d", m.Table(2), m.NumFree())
	}
	seen := map[int32]bool{}
	for _, s := range []SeqID{1, 2} {
		for _, b := range m.Table(s) {
			if seen[b] {
				t.Fatalf("block %d owned twice", b)
			}
			seen[b] = true
		}
	}
	m.Free(1)
	m.Free(1) // no-op
	if m.NumFree() != 3 || m.NumUsed() != 2 {
		t.Fatalf("after free: free %d used %d", m.NumFree(), m.NumUsed())
	}
	if err := m.Reserve(2, 17); err != nil {
		t.Fatal(err)
	}
	if m.NumFree()+m.NumUsed() != 5 {
		t.Fatalf("blocks lost: free %d used %d", m.NumFree(), m.NumUsed())
	}
}

func TestReserveZero(t *testing.T) {
	m := NewBlockManager(1, 4)
	if err := m.Reserve(7, 0); err != nil {
		t.Fatal(err)
	}
	if m.Table(7) != nil || m.NumFree() != 1 {
		t.Fatal("empty reservation took a block")
	}
}
