package fsm

import (
	"fmt"
	"testing"
)

// TestRequestTableBranches: tables share their storage, and a table grows in
// place only once. Two tables grown from one (which Apply never makes, but
// nothing in the type forbids) must each see their own records only, across
// index rebuilds and evictions.
func TestRequestTableBranches(t *testing.T) {
	var base *requestTable
	index := uint64(0)
	rec := func(id string) RequestRecord {
		index++
		return RequestRecord{Identity: "i", RequestID: id, Index: index, Subject: "member/m"}
	}
	for i := range MaxRequests - 10 {
		base = base.with(rec(fmt.Sprint("base-", i)))
	}
	a, b := base, base
	for i := range 2 * requestIndexEvery {
		a = a.with(rec(fmt.Sprint("a-", i)))
		b = b.with(rec(fmt.Sprint("b-", i)))
	}
	for i := range 2 * requestIndexEvery {
		if _, ok := a.lookup("i", fmt.Sprint("b-", i)); ok {
			t.Fatalf("branch a sees b-%d", i)
		}
		if _, ok := b.lookup("i", fmt.Sprint("a-", i)); ok {
			t.Fatalf("branch b sees a-%d", i)
		}
		if _, ok := a.lookup("i", fmt.Sprint("a-", i)); !ok {
			t.Fatalf("branch a lost a-%d", i)
		}
		if _, ok := b.lookup("i", fmt.Sprint("b-", i)); !ok {
			t.Fatalf("branch b lost b-%d", i)
		}
	}
	for _, tb := range []*requestTable{a, b} {
		if len(tb.recs) != MaxRequests {
			t.Errorf("len(recs) = %d, want %d", len(tb.recs), MaxRequests)
		}
		if _, ok := tb.lookup("i", "base-0"); ok {
			t.Errorf("evicted base-0 still found")
		}
		for i := 1; i < len(tb.recs); i++ {
			if tb.recs[i].Index <= tb.recs[i-1].Index {
				t.Fatalf("recs not oldest first at %d", i)
			}
		}
	}
	if _, ok := base.lookup("i", "a-0"); ok {
		t.Errorf("the base table sees a later record")
	}
}
