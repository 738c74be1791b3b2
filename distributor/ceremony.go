package distributor

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// Ceremony errors; errors.go maps them to gRPC codes.
var (
	errNoCeremony       = errors.New("distributor: no such ceremony")
	errCeremonyClosed   = errors.New("distributor: ceremony is not open")
	errCeremonyExpired  = errors.New("distributor: ceremony expired")
	errWrongKind        = errors.New("distributor: wrong kind of ceremony for this call")
	errUnreadableShare  = errors.New("distributor: cannot open the sealed share (wrong ceremony key, ceremony, genesis or index, or tampered)")
	errShareMismatch    = errors.New("distributor: released share does not name this ceremony's genesis, epoch and index")
	errOfficerRepeated  = errors.New("distributor: officer already submitted a share to this ceremony")
	errOfficerNotOnSlot = errors.New("distributor: the manifest assigns this share to another officer")
)

// HPKE info labels (see distributor.proto).
const (
	infoShare     = "cairn/distributor/v1/share"
	infoProvision = "cairn/distributor/v1/provision"
	infoRootKey   = "cairn/distributor/v1/root-key"
)

// ceremony is one unseal or provisioning ceremony, held in memory only: a
// restart forgets it (and every share it received).
type ceremony struct {
	id        string
	kind      distributorv1.CeremonyKind
	state     distributorv1.CeremonyState
	manifest  *safev1.GenesisManifest
	recipient *hpkeseal.Recipient
	combiner  *safe.Combiner // unseal ceremonies
	officers  []string       // who contributed accepted shares, in order
	accepted  []uint32       // their share indices, in the same order
	openedAt  time.Time
	expiresAt time.Time
	detail    string
}

func openCeremony(kind distributorv1.CeremonyKind, m *safev1.GenesisManifest, now time.Time, ttl time.Duration) (*ceremony, error) {
	var id [16]byte
	_, _ = rand.Read(id[:])
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return nil, err
	}
	c := &ceremony{
		id: hex.EncodeToString(id[:]), kind: kind, state: distributorv1.CeremonyState_CEREMONY_STATE_OPEN,
		manifest: m, recipient: r, openedAt: now, expiresAt: now.Add(ttl),
	}
	if kind == distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL {
		if c.combiner, err = safe.NewCombiner(m); err != nil {
			r.Close()
			return nil, err
		}
	}
	return c, nil
}

// end closes the ceremony in state st and wipes everything it holds.
func (c *ceremony) end(st distributorv1.CeremonyState, detail string) {
	c.state, c.detail = st, detail
	if c.combiner != nil {
		c.combiner.Wipe()
	}
	if c.recipient != nil {
		c.recipient.Close()
		c.recipient = nil
	}
}

// checkOpen expires the ceremony if its time is up and reports whether it
// still accepts input.
func (c *ceremony) checkOpen(now time.Time) error {
	if c.state == distributorv1.CeremonyState_CEREMONY_STATE_OPEN && !now.Before(c.expiresAt) {
		c.end(distributorv1.CeremonyState_CEREMONY_STATE_EXPIRED, "expired before the threshold was met; shares wiped")
	}
	switch c.state {
	case distributorv1.CeremonyState_CEREMONY_STATE_OPEN:
		return nil
	case distributorv1.CeremonyState_CEREMONY_STATE_EXPIRED:
		return fmt.Errorf("%w at %s", errCeremonyExpired, c.expiresAt.UTC().Format(time.RFC3339))
	default:
		return fmt.Errorf("%w (%s)", errCeremonyClosed, c.state)
	}
}

// submit checks one released share and accepts it. At the threshold it
// combines the shares and returns the RMK (checked against the KCV). Any
// error leaves the ceremony as it was, except a failed combination, which
// ends it.
func (c *ceremony) submit(officer identity.ID, index uint32, sealed *cryptov1.HpkeSealed, now time.Time) (secret.Bytes, error) {
	if err := c.checkOpen(now); err != nil {
		return secret.Bytes{}, err
	}
	if c.kind != distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL {
		return secret.Bytes{}, errWrongKind
	}
	slot := safe.Slot(c.manifest, index)
	if slot == nil {
		return secret.Bytes{}, fmt.Errorf("%w: index %d", safe.ErrUnknownShare, index)
	}
	if slot.GetOfficer() != "" && slot.GetOfficer() != officer.String() {
		return secret.Bytes{}, fmt.Errorf("%w: share %d belongs to %s", errOfficerNotOnSlot, index, slot.GetOfficer())
	}
	for _, o := range c.officers {
		if o == officer.String() {
			return secret.Bytes{}, fmt.Errorf("%w: %s", errOfficerRepeated, officer)
		}
	}
	info, err := hpkeseal.Info(infoShare, c.id, c.manifest.GetGenesisId(), strconv.FormatUint(uint64(index), 10))
	if err != nil {
		return secret.Bytes{}, err
	}
	plain, err := c.recipient.Open(sealed, info)
	if err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	defer plain.Wipe()
	raw := plain.Data()
	defer clear(raw)
	var rel safev1.ReleasedShare
	if err := proto.Unmarshal(raw, &rel); err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	share := secret.New(rel.GetShare())
	clear(rel.Share)
	defer share.Wipe()
	if rel.GetGenesisId() != c.manifest.GetGenesisId() || rel.GetEpoch() != c.manifest.GetEpoch() || rel.GetIndex() != index {
		return secret.Bytes{}, fmt.Errorf("%w: got %s/%d/%d", errShareMismatch, rel.GetGenesisId(), rel.GetEpoch(), rel.GetIndex())
	}
	if err := c.combiner.Add(index, share); err != nil {
		return secret.Bytes{}, err
	}
	c.officers = append(c.officers, officer.String())
	c.accepted = append(c.accepted, index)
	if !c.combiner.Ready() {
		return secret.Bytes{}, nil
	}
	rmk, err := c.combiner.Combine()
	if err != nil {
		c.end(distributorv1.CeremonyState_CEREMONY_STATE_FAILED, err.Error()+"; shares wiped")
		return secret.Bytes{}, err
	}
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, "root key reconstructed and matched the KCV")
	return rmk, nil
}

// provision opens a whole RMK sent by genesis and checks it against the
// ceremony's manifest.
func (c *ceremony) provision(sealed *cryptov1.HpkeSealed, now time.Time) (secret.Bytes, error) {
	if err := c.checkOpen(now); err != nil {
		return secret.Bytes{}, err
	}
	if c.kind != distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION {
		return secret.Bytes{}, errWrongKind
	}
	info, err := hpkeseal.Info(infoProvision, c.id, c.manifest.GetGenesisId())
	if err != nil {
		return secret.Bytes{}, err
	}
	rmk, err := c.recipient.Open(sealed, info)
	if err != nil {
		return secret.Bytes{}, errUnreadableShare
	}
	if !safe.CheckKCV(rmk, c.manifest) {
		rmk.Wipe()
		return secret.Bytes{}, fmt.Errorf("%w: the provisioned key is not the manifest's", safe.ErrKCVMismatch)
	}
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, "root key provisioned and matched the KCV")
	return rmk, nil
}

// proto returns the ceremony's public view: never share bytes.
func (c *ceremony) proto() *distributorv1.Ceremony {
	out := &distributorv1.Ceremony{
		Id: c.id, Kind: c.kind, State: c.state, GenesisId: c.manifest.GetGenesisId(),
		Threshold: c.manifest.GetThreshold(), Officers: append([]string(nil), c.officers...),
		AcceptedIndices: append([]uint32(nil), c.accepted...),
		OpenedAt:        timestamppb.New(c.openedAt), ExpiresAt: timestamppb.New(c.expiresAt), Detail: c.detail,
	}
	if c.kind == distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION {
		out.Threshold = 1
	}
	if c.recipient != nil {
		out.CeremonyKey = c.recipient.PublicKey()
	}
	return out
}
