package rootkms

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
)

// TestJudgeClocks: the leader may judge a step on its clock only if the
// median clock of a majority of voters (its own offset 0 included) is within
// the bound; a minority of wrong clocks, the leader's or a follower's, does
// not move the median; without a majority of answers it refuses with
// Unavailable, and a wrong leader clock is refused with FailedPrecondition
// naming by how much, who answered and what to fix.
func TestJudgeClocks(t *testing.T) {
	const bound = 2 * time.Second
	pc := func(id string, off time.Duration) peerClock { return peerClock{ID: id, Offset: off} }
	down := []peerFailure{{ID: "rootkms-3", Why: "no answer at 127.0.0.1:1: connection refused"}}
	for _, tc := range []struct {
		name     string
		voters   int
		answers  []peerClock
		failures []peerFailure
		code     codes.Code // OK: the leader may go ahead
		median   time.Duration
		off      []string // voters reported off the quorum's clock
		msg      []string // in the refusal
	}{
		{name: "a single voter is its own quorum", voters: 1, code: codes.OK},
		{name: "all agree", voters: 3, answers: []peerClock{pc("rootkms-2", 3*time.Millisecond), pc("rootkms-3", -2*time.Millisecond)},
			code: codes.OK},
		{name: "within the bound", voters: 3, answers: []peerClock{pc("rootkms-2", 1500*time.Millisecond), pc("rootkms-3", 1900*time.Millisecond)},
			code: codes.OK, median: 1500 * time.Millisecond},
		{name: "leader +1h", voters: 3, answers: []peerClock{pc("rootkms-2", -time.Hour), pc("rootkms-3", -time.Hour+time.Millisecond)},
			code: codes.FailedPrecondition, median: -time.Hour + time.Millisecond,
			msg: []string{"rootkms-1", "ahead of", "rootkms-2 -1h0m0s", "fix NTP on rootkms-1", "PROMOTE", "nothing was proposed", "2s allowed"}},
		{name: "leader -1h", voters: 3, answers: []peerClock{pc("rootkms-2", time.Hour), pc("rootkms-3", time.Hour)},
			code: codes.FailedPrecondition, median: time.Hour,
			msg: []string{"1h0m0s behind", "rootkms-3 +1h0m0s", "fix NTP on rootkms-1"}},
		{name: "leader +1h, one follower answering", voters: 3, answers: []peerClock{pc("rootkms-2", -time.Hour)}, failures: down,
			code: codes.FailedPrecondition, median: -time.Hour / 2, msg: []string{"ahead of", "fix NTP on rootkms-1"}},
		{name: "one follower +1h: the median ignores it", voters: 3, answers: []peerClock{pc("rootkms-2", 0), pc("rootkms-3", time.Hour)},
			code: codes.OK, off: []string{"rootkms-3"}},
		{name: "one follower -1h of five", voters: 5,
			answers: []peerClock{pc("rootkms-2", time.Millisecond), pc("rootkms-3", -time.Hour), pc("rootkms-4", 0), pc("rootkms-5", -time.Millisecond)},
			code:    codes.OK, off: []string{"rootkms-3"}},
		{name: "two of five followers wrong, the other two agree", voters: 5,
			answers: []peerClock{pc("rootkms-2", time.Hour), pc("rootkms-3", time.Hour), pc("rootkms-4", 0), pc("rootkms-5", 0)},
			code:    codes.OK, off: []string{"rootkms-2", "rootkms-3"}},
		{name: "leader +1h of five, a bare majority answering", voters: 5,
			answers: []peerClock{pc("rootkms-2", -time.Hour), pc("rootkms-3", -time.Hour)},
			code:    codes.FailedPrecondition, median: -time.Hour, msg: []string{"ahead of"}},
		{name: "an even count: both middle clocks must agree", voters: 5,
			answers: []peerClock{pc("rootkms-2", 0), pc("rootkms-3", time.Hour), pc("rootkms-4", time.Hour)},
			code:    codes.FailedPrecondition, median: time.Hour / 2},
		{name: "not enough answers", voters: 3, failures: append(down, peerFailure{ID: "rootkms-2", Why: "no API address registered"}),
			code: codes.Unavailable, msg: []string{"cannot confirm the clock with a quorum", "needs 2 of 3", "only 1 did", "rootkms-3: no answer", "rootkms-2: no API address registered"}},
		{name: "not enough answers of five", voters: 5, answers: []peerClock{pc("rootkms-2", 0)},
			code: codes.Unavailable, msg: []string{"needs 3 of 5"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := judgeClocks("rootkms-1", tc.voters, tc.answers, tc.failures, bound, "PROMOTE")
			if got := status.Code(err); got != tc.code {
				t.Fatalf("judgeClocks = %v, want code %v", err, tc.code)
			}
			if tc.code != codes.Unavailable && v.Median != tc.median {
				t.Errorf("median = %v, want %v", v.Median, tc.median)
			}
			if v.Agree != (tc.code == codes.OK) {
				t.Errorf("Agree = %v with error %v", v.Agree, err)
			}
			var off []string
			for _, o := range v.Off {
				off = append(off, o.ID)
			}
			if strings.Join(off, ",") != strings.Join(tc.off, ",") {
				t.Errorf("voters off the quorum's clock = %v, want %v", off, tc.off)
			}
			for _, want := range tc.msg {
				if !strings.Contains(status.Convert(err).Message(), want) {
					t.Errorf("refusal %q does not say %q", status.Convert(err).Message(), want)
				}
			}
		})
	}
}

// TestMaxClockSkewConfig: the bound defaults to DefaultMaxClockSkew, or a
// quarter of a short window; a negative bound, or one not below the window,
// is a configuration error.
func TestMaxClockSkewConfig(t *testing.T) {
	for _, tc := range []struct {
		window, skew time.Duration
		ok           bool
	}{
		{0, 0, true}, {time.Minute, 0, true}, {2 * time.Second, 0, true}, {time.Minute, 5 * time.Second, true},
		{0, -time.Second, false}, {time.Minute, time.Minute, false}, {0, time.Hour, false},
	} {
		c := Config{Safety: SafetyConfig{Window: tc.window, MaxClockSkew: tc.skew}}
		err := c.Validate()
		if got := err == nil || !strings.Contains(err.Error(), "max clock skew"); got != tc.ok {
			t.Errorf("Validate(window %v, max clock skew %v) = %v, want ok %v", tc.window, tc.skew, err, tc.ok)
		}
	}
	src := identitytest.New(t, identitytest.TrustDomain).Source("spiffe://cairn.test/rootkms/global/rootkms-1")
	for _, tc := range []struct{ window, skew, want time.Duration }{
		{0, 0, DefaultMaxClockSkew}, {time.Minute, 0, DefaultMaxClockSkew}, {2 * time.Second, 0, 500 * time.Millisecond},
		{time.Minute, 5 * time.Second, 5 * time.Second},
	} {
		c := Config{Source: src, Safety: SafetyConfig{Window: tc.window, MaxClockSkew: tc.skew}}
		if err := c.setDefaults(); err != nil {
			t.Fatal(err)
		}
		if c.Safety.MaxClockSkew != tc.want {
			t.Errorf("max clock skew for window %v, configured %v = %v, want %v", tc.window, tc.skew, c.Safety.MaxClockSkew, tc.want)
		}
	}
}

// TestCollectClocksSettlesEarly: the clock round ends once a majority of
// voters (the leader included) answered within the bound, without the
// voter that never answers (paused); it waits for the rest while the
// answers in hand cannot settle it (too few, or off the leader's clock),
// and then judgeClocks decides on every answer.
func TestCollectClocksSettlesEarly(t *testing.T) {
	const bound = 2 * time.Second
	collect := func(peers, voters int, sent ...clockAnswer) ([]peerClock, []peerFailure) {
		out := make(chan clockAnswer, peers)
		for _, a := range sent {
			out <- a
		}
		done := make(chan struct{})
		var answers []peerClock
		var failures []peerFailure
		go func() {
			defer close(done)
			answers, failures = collectClocks(out, peers, voters, bound)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("collectClocks(%d peers of %d voters, %d answers sent) still waiting after 10 s: it waits for an answer that never comes", peers, voters, len(sent))
		}
		return answers, failures
	}
	near := func(id string, d time.Duration) clockAnswer { return clockAnswer{ok: peerClock{ID: id, Offset: d}} }
	failed := func(id string) clockAnswer { return clockAnswer{bad: &peerFailure{ID: id, Why: "no answer"}} }

	// 5 voters: the leader and two near clocks are a majority; r5 is paused.
	answers, failures := collect(4, 5, near("r2", 10*time.Millisecond), failed("r3"), near("r4", -5*time.Millisecond))
	if len(answers) != 2 || len(failures) != 1 {
		t.Errorf("5 voters, r5 paused: answers %v, failures %v; want r2 and r4 answered, r3 failed", answers, failures)
	}
	if v, err := judgeClocks("r1", 5, answers, failures, bound, "promote"); err != nil || !v.Agree {
		t.Errorf("judgeClocks(the settled answers) = %+v, %v; want agreement", v, err)
	}
	// 3 voters: one near clock settles it; the paused voter is not waited for.
	if answers, _ := collect(2, 3, near("r2", time.Millisecond)); len(answers) != 1 {
		t.Errorf("3 voters, r3 paused: answers %v, want r2's alone", answers)
	}
	// A clock off the leader's does not settle it: every answer is read,
	// and the quorum's median decides (here: the leader is the one off).
	answers, _ = collect(2, 3, near("r2", time.Hour), near("r3", time.Hour+time.Millisecond))
	if len(answers) != 2 {
		t.Errorf("3 voters, both others an hour ahead: answers %v, want both", answers)
	}
	if _, err := judgeClocks("r1", 3, answers, nil, bound, "destroy"); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("judgeClocks(the leader an hour behind both others) = %v, want FailedPrecondition", err)
	}
}
