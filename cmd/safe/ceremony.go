package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
)

// ceremonyUsage is the help of "safe ceremony": its verbs and the fields of
// --json, which are stable (new fields may be added; none is renamed or
// removed).
const ceremonyUsage = `safe ceremony: open, show or cancel an unseal ceremony on a sealed distributor

Usage: safe ceremony open|status|cancel --distributor ADDR [flags] [identity flags]

Verbs:
  open     open an unseal ceremony; prints its ID and the "safe release" command
           each officer runs next
  status   the distributor's seal state and its ceremony (or --ceremony ID's):
           shares accepted, shares still needed, and the next command
  cancel   cancel --ceremony ID (--reason is audited); the shares it accepted are wiped

Every verb (and "safe release") ends with the next step: a line "next: ..." and,
when there is something to run, the command on the line after it.

--json prints one JSON object instead:
  distributor        the distributor's address
  seal_state         SEALED or UNSEALED (status without --ceremony only)
  genesis_id, kcv    the root key the distributor is pinned to (idem; kcv in hex)
  unsealed_by        how it was unsealed: ceremony:ID, peer:ADDR or genesis:ID (idem)
  ceremony           null, or: id, kind (UNSEAL or REKEY), state (OPEN, SUCCEEDED, FAILED,
                     CANCELLED, EXPIRED), genesis_id, threshold, accepted_shares
                     (share indices), officers (SPIFFE IDs), shares_needed,
                     opened_at, expires_at (RFC 3339), detail
  next               step (what happens next, for people) and command (the
                     command to run next; absent when there is none)

Run "safe ceremony <verb> -h" for a verb's flags.
`

// ceremony implements "safe ceremony open|status|cancel".
func ceremony(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, ceremonyUsage)
		return errUsage
	}
	verb := args[0]
	switch verb {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, ceremonyUsage)
		return flag.ErrHelp
	case "open", "status", "cancel":
	default:
		fmt.Fprintf(stderr, "safe ceremony: unknown verb %q (open, status, cancel)\n\n%s", verb, ceremonyUsage)
		return errUsage
	}
	fs := newFlags("ceremony "+verb, stdout, stderr)
	var (
		id        identity.Flags
		addr, cid string
		reason    string
		ttl       time.Duration
		asJSON    bool
	)
	id.Register(fs.FlagSet)
	fs.StringVar(&addr, "distributor", "", "host:port of the distributor (required)")
	if verb != "open" {
		fs.StringVar(&cid, "ceremony", "", "ceremony id (status: default the distributor's current ceremony; cancel: required)")
	}
	if verb == "cancel" {
		fs.StringVar(&reason, "reason", "", "why (audited)")
	}
	if verb == "open" {
		fs.DurationVar(&ttl, "ttl", 0, "ceremony lifetime (default the distributor's)")
	}
	fs.BoolVar(&asJSON, "json", false, "print one JSON object (fields in \"safe ceremony -h\")")
	if err := fs.parse(args[1:]); err != nil {
		return err
	}
	switch {
	case addr == "":
		return fs.required("--distributor is required")
	case verb == "cancel" && cid == "":
		return fs.required("--ceremony is required")
	}
	client, closeConn, err := dial(&id, addr)
	if err != nil {
		return err
	}
	defer closeConn()
	r := ceremonyReport{Distributor: addr}
	var (
		c  *distributorv1.Ceremony
		st *distributorv1.GetStatusResponse
	)
	switch verb {
	case "open":
		c, err = client.OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL, TtlSeconds: uint32(ttl / time.Second)})
	case "status":
		if cid == "" {
			if st, err = client.GetStatus(ctx, &distributorv1.GetStatusRequest{}); err == nil {
				r.SealState = strings.TrimPrefix(st.GetState().String(), "SEAL_STATE_")
				r.GenesisID, r.KCV, r.UnsealedBy = st.GetGenesisId(), hex.EncodeToString(st.GetKcv()), st.GetUnsealedBy()
				c = st.GetCeremony()
			}
		} else {
			c, err = client.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: cid})
		}
	case "cancel":
		c, err = client.CancelCeremony(ctx, &distributorv1.CancelCeremonyRequest{CeremonyId: cid, Reason: reason})
	}
	if err != nil {
		return err
	}
	r.Ceremony = ceremonyOf(c)
	r.Next = nextStep(addr, c, st, &id, "")
	return r.write(stdout, asJSON)
}

// ceremonyReport is what the ceremony verbs and "safe release" print; its
// JSON field names are stable (ceremonyUsage documents them).
type ceremonyReport struct {
	Distributor string        `json:"distributor"`
	SealState   string        `json:"seal_state,omitempty"`
	GenesisID   string        `json:"genesis_id,omitempty"`
	KCV         string        `json:"kcv,omitempty"`
	UnsealedBy  string        `json:"unsealed_by,omitempty"`
	Ceremony    *ceremonyJSON `json:"ceremony"`
	Next        next          `json:"next"`
}

// ceremonyJSON is a ceremony as --json prints it.
type ceremonyJSON struct {
	ID             string    `json:"id"`
	Kind           string    `json:"kind"`
	State          string    `json:"state"`
	GenesisID      string    `json:"genesis_id"`
	Threshold      uint32    `json:"threshold"`
	AcceptedShares []uint32  `json:"accepted_shares"`
	Officers       []string  `json:"officers"`
	SharesNeeded   uint32    `json:"shares_needed"`
	OpenedAt       time.Time `json:"opened_at,omitzero"`
	ExpiresAt      time.Time `json:"expires_at,omitzero"`
	Detail         string    `json:"detail,omitempty"`
}

// next is the next step: what happens, and the command to run ("" when
// there is none).
type next struct {
	Step    string `json:"step"`
	Command string `json:"command,omitempty"`
}

// ceremonyOf converts c (nil: nil).
func ceremonyOf(c *distributorv1.Ceremony) *ceremonyJSON {
	if c == nil {
		return nil
	}
	j := &ceremonyJSON{
		ID:             c.GetId(),
		Kind:           strings.TrimPrefix(c.GetKind().String(), "CEREMONY_KIND_"),
		State:          strings.TrimPrefix(c.GetState().String(), "CEREMONY_STATE_"),
		GenesisID:      c.GetGenesisId(),
		Threshold:      c.GetThreshold(),
		AcceptedShares: append([]uint32{}, c.GetAcceptedIndices()...),
		Officers:       append([]string{}, c.GetOfficers()...),
		Detail:         c.GetDetail(),
	}
	if c.GetState() == distributorv1.CeremonyState_CEREMONY_STATE_OPEN && int(c.GetThreshold()) > len(c.GetAcceptedIndices()) {
		j.SharesNeeded = c.GetThreshold() - uint32(len(c.GetAcceptedIndices()))
	}
	if c.GetOpenedAt() != nil {
		j.OpenedAt = c.GetOpenedAt().AsTime().UTC()
	}
	if c.GetExpiresAt() != nil {
		j.ExpiresAt = c.GetExpiresAt().AsTime().UTC()
	}
	return j
}

// nextStep says what comes after c on the distributor at addr (st is its
// status, when known): the release command while shares are needed, a new
// ceremony once one ended without unsealing it. id are the identity flags
// the officer gave; manifest is the genesis manifest's path when known.
func nextStep(addr string, c *distributorv1.Ceremony, st *distributorv1.GetStatusResponse, id *identity.Flags, manifest string) next {
	ids := identityArgs(id)
	open := commandLine(append([]string{progName, "ceremony", "open", "--distributor", addr}, ids...))
	if st != nil && st.GetState() == distributorv1.SealState_SEAL_STATE_UNSEALED {
		// Whatever ceremony it still shows (the one that unsealed it).
		return next{Step: fmt.Sprintf("nothing to do: the distributor is unsealed (%s)", st.GetUnsealedBy())}
	}
	if c == nil {
		return next{Step: "the distributor is sealed and has no ceremony: open one, then K officers release their shares", Command: open}
	}
	switch c.GetState() {
	case distributorv1.CeremonyState_CEREMONY_STATE_OPEN:
		if manifest == "" {
			manifest = "GENESIS_MANIFEST"
		}
		need := int(c.GetThreshold()) - len(c.GetAcceptedIndices())
		release := commandLine(append([]string{progName, "release", "--distributor", addr, "--ceremony", c.GetId(),
			"--safe", "SAFE_CONFIG", "--manifest", manifest}, ids...))
		return next{
			Step: fmt.Sprintf("%d more %s needed (%d of %d accepted) before %s: each officer releases one from their own safe, with their own identity",
				need, plural(need, "share", "shares"), len(c.GetAcceptedIndices()), c.GetThreshold(), c.GetExpiresAt().AsTime().UTC().Format(time.RFC3339)),
			Command: release,
		}
	case distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED:
		return next{Step: "nothing to do: the ceremony unsealed the distributor; its peers unseal from it"}
	default:
		return next{Step: fmt.Sprintf("the ceremony ended %s without unsealing the distributor: open a new one",
			strings.ToLower(strings.TrimPrefix(c.GetState().String(), "CEREMONY_STATE_"))), Command: open}
	}
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// identityArgs are the identity flags id was given, in a fixed order.
func identityArgs(id *identity.Flags) []string {
	var out []string
	for _, f := range []struct{ name, value string }{
		{"--trust-domain", id.TrustDomain}, {"--dev-certs", id.DevCerts}, {"--name", id.Name},
		{"--cert", id.Cert}, {"--key", id.Key}, {"--ca", id.CA},
	} {
		if f.value != "" {
			out = append(out, f.name, f.value)
		}
	}
	return out
}

// plainWord is an argument a shell takes as it is.
var plainWord = regexp.MustCompile(`^[A-Za-z0-9_./:=@%+,-]+$`)

// commandLine joins args into a line a POSIX shell reads back as args.
func commandLine(args []string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		if plainWord.MatchString(a) {
			quoted[i] = a
		} else {
			quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(quoted, " ")
}

// write writes the report as text or, with asJSON, as one JSON object.
func (r ceremonyReport) write(w io.Writer, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	if r.SealState != "" {
		fmt.Fprintf(w, "distributor %s: %s, genesis %s, KCV %s, unsealed by %q\n", r.Distributor, r.SealState, r.GenesisID, r.KCV, r.UnsealedBy)
	}
	if c := r.Ceremony; c != nil {
		expires := "-"
		if !c.ExpiresAt.IsZero() {
			expires = c.ExpiresAt.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "ceremony %s (%s): %s, %d of %d shares %v from %v, expires %s", c.ID, c.Kind, c.State,
			len(c.AcceptedShares), c.Threshold, c.AcceptedShares, c.Officers, expires)
		if c.Detail != "" {
			fmt.Fprintf(w, " (%s)", c.Detail)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "next: %s\n", r.Next.Step)
	if r.Next.Command != "" {
		fmt.Fprintf(w, "  %s\n", r.Next.Command)
	}
	return nil
}
