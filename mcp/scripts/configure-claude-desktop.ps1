<#
.SYNOPSIS
  Adds (or updates) a Flotilla entry in Claude Desktop's MCP servers, pointing at `flotilla mcp`.

.DESCRIPTION
  Config file: %APPDATA%\Claude\claude_desktop_config.json (override with -Config).
  Idempotent: an unchanged entry leaves the file untouched; otherwise the previous file is kept
  as <file>.bak-<UTC time to the
  microsecond>. Other servers and settings are preserved. Restart Claude
  Desktop afterwards.

.EXAMPLE
  .\configure-claude-desktop.ps1 -Server http://127.0.0.1:8080 -TokenFile $HOME\.flotilla\token -ReadOnly
#>
param(
  [string]$Server = "http://127.0.0.1:8080",
  [string]$TokenFile = "",
  [switch]$ReadOnly,
  [string]$Name = "flotilla",
  [string]$Command = "",
  [string]$Config = ""
)
$ErrorActionPreference = "Stop"

if ($Server -notmatch '^https?://') { throw "-Server must be an http:// or https:// URL, got $Server" }
if ($Name -notmatch '^[A-Za-z0-9_-]+$') { throw "-Name must be letters, digits, _ or -" }
# Without a token the entry could only ever answer "unauthorized": refuse to write it.
if (-not $TokenFile) { throw "-TokenFile is required: the file holding a Flotilla API token (a local server writes data\admin.token; see api.tokens_file). Without one every tool call fails as unauthorized" }
if (-not $Command) {
  $found = Get-Command flotilla -ErrorAction SilentlyContinue
  if (-not $found) { throw "flotilla is not on PATH: install it with ``cargo install --locked --path server`` from the repository (into ~\.cargo\bin), or pass -Command C:\path\to\flotilla.exe" }
  $Command = $found.Source
}
# Desktop apps do not inherit the shell's PATH or working directory: use absolute paths.
$Command = [System.IO.Path]::GetFullPath($Command)
if (-not (Test-Path -LiteralPath $Command -PathType Leaf)) { throw "-Command $Command is not a file" }
if ($TokenFile) {
  $TokenFile = [System.IO.Path]::GetFullPath($TokenFile)
  if (-not (Test-Path $TokenFile)) { Write-Warning "$TokenFile does not exist (yet)" }
}
if (-not $Config) {
  if ($env:APPDATA) { $Config = Join-Path $env:APPDATA "Claude\claude_desktop_config.json" }
  elseif ($IsMacOS) { $Config = Join-Path $HOME "Library/Application Support/Claude/claude_desktop_config.json" }
  else { $Config = Join-Path $HOME ".config/Claude/claude_desktop_config.json" }
}

$cmdArgs = @("mcp", "--server", $Server)
if ($TokenFile) { $cmdArgs += @("--token-file", $TokenFile) }
if ($ReadOnly) { $cmdArgs += "--read-only" }
# As in the Codex entry: the client shows a stdio server's stderr as errors, so only warnings.
$entry = [ordered]@{ command = $Command; args = $cmdArgs; env = [ordered]@{ FLOTILLA_LOG = "warn" } }

$doc = [ordered]@{}
if (Test-Path $Config) {
  $text = Get-Content -Raw -Path $Config
  if ($text -and $text.Trim()) {
    try { $doc = $text | ConvertFrom-Json } catch { throw "$Config is not valid JSON ($_); fix or move it first" }
  }
}
if ($doc -is [System.Collections.IDictionary]) { $doc = [pscustomobject]$doc }
if (-not ($doc.PSObject.Properties.Name -contains "mcpServers")) {
  $doc | Add-Member -NotePropertyName mcpServers -NotePropertyValue ([pscustomobject]@{})
}
$servers = $doc.mcpServers
$current = $servers.PSObject.Properties[$Name]
$wanted = ($entry | ConvertTo-Json -Depth 10 -Compress)
if ($current -and (($current.Value | ConvertTo-Json -Depth 10 -Compress) -eq $wanted)) {
  Write-Output "${Config}: $Name already up to date"
  exit 0
}
if ($current) { $servers.PSObject.Properties.Remove($Name) }
$servers | Add-Member -NotePropertyName $Name -NotePropertyValue ([pscustomobject]$entry)

if (Test-Path $Config) {
  # Microseconds, and a counter on a clash: two runs in one second keep two backups.
  $stamp = (Get-Date).ToUniversalTime().ToString("yyyyMMddTHHmmss.ffffffZ")
  $backup = "$Config.bak-$stamp"
  $n = 1
  while (Test-Path -LiteralPath $backup) { $backup = "$Config.bak-$stamp-$n"; $n++ }
  Copy-Item -LiteralPath $Config -Destination $backup
  Write-Output "backup: $backup"
}
$dir = Split-Path -Parent $Config
if ($dir -and -not (Test-Path $dir)) { New-Item -ItemType Directory -Path $dir | Out-Null }
$json = $doc | ConvertTo-Json -Depth 20
# UTF-8 without a BOM: some JSON readers refuse the BOM Windows PowerShell 5 would write.
[System.IO.File]::WriteAllText($Config, $json + "`n", (New-Object System.Text.UTF8Encoding($false)))
Write-Output "${Config}: $Name -> $Command $($cmdArgs -join ' ')"
