// The page's short-lived session with the demo server: a loopback-only token (POST /api/session) that the demo
// server's tier proxy accepts until it expires; the long-lived tier token never reaches the page.
export interface Session {
  token: string;
  expires_at: number; // unix seconds
  ttl_s: number;
  manifest_sha256: string | null;
  max_text_chars: number;
  tiers: string[];
}

export async function openSession(): Promise<Session> {
  let response: Response;
  try {
    response = await fetch("/api/session", { method: "POST", cache: "no-store" });
  } catch (exc) {
    throw new Error(`the demo server does not answer (${(exc as Error).message}): start it with \`dimec demo RUN_DIR\``);
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`the demo server refused a session: ${body.error ?? response.status}`);
  return body as Session;
}

export async function tierHealth(tier: string, token: string): Promise<string | null> {
  try {
    const r = await fetch(`/tier/${tier}/healthz`, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
    if (r.ok) return null;
    const body = await r.json().catch(() => ({}));
    return `${tier}: ${body.error ?? `HTTP ${r.status}`}`;
  } catch (exc) {
    return `${tier}: ${(exc as Error).message}`;
  }
}
